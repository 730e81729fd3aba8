"""Global Style Loss (Gram) and Local Patch Loss (MRF): each adds style terms to a STYLE_LOSSES chain."""

from __future__ import annotations

from functools import partial

from ..fusion_core.config import GLOBAL_LAYERS, PAPER_GLOBAL_LAYERS, GlobalStyle, LocalStyle, defaults
from .common import CATEGORY, LAYERS, PACK_ALIASES, STYLE_LOSSES, chain, parse_layers
from .tensors import single_mask, split_images

_GLOBAL, _LOCAL = defaults(GlobalStyle), defaults(LocalStyle)  # fusion_core's defaults

STYLE_IMAGE = (
    "IMAGE",
    {"tooltip": "The style image. A batch of several images blends them equally (the weight is shared)."},
)
BLEND = (
    "FLOAT",
    {
        "default": 1.0,
        "min": 0.0,
        "max": 1.0,
        "step": 0.01,
        "tooltip": "This style's share when several styles are chained: multiplies the weight (e.g. 0.7 on one "
        "style's losses and 0.3 on the other's). A style batch is split equally on top of it; 0 switches it off.",
    },
)
STYLE_SCALE = (
    "FLOAT",
    {
        "default": 1.0,
        "min": 0.05,
        "max": 8.0,
        "step": 0.05,
        "tooltip": "Size of the style image relative to the output: above 1 gives larger brush strokes, below 1 "
        "finer ones.",
    },
)
OPTIONAL = {
    "mask": ("MASK", {"tooltip": "Where on the output this style applies (1 = here); stretched to the output size."}),
    "style_mask": ("MASK", {"tooltip": "Which part of the style image to take the style from (1 = from here)."}),
    "style_losses": (STYLE_LOSSES, {"tooltip": "Style losses to add these to, for several styles or regions."}),
    "blend": BLEND,
}


class _StyleLoss:
    """What the two loss nodes share: their output, and how a style batch and masks become terms."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (STYLE_LOSSES,)
    RETURN_NAMES = ("style_losses",)
    OUTPUT_TOOLTIPS = ("The chained-in style losses plus this one, for Fused Style Optimize.",)
    FUNCTION = "add"

    @staticmethod
    def chained(make_term, style_image, weight, mask, style_mask, style_losses, blend) -> tuple[list]:
        """One term per image of the style batch, each with an equal part of ``blend``, after the chained-in ones;
        the run shares each kind's weight out by the blends (fusion_core.choices.blend_shares)."""
        images = split_images("style_image", style_image)
        mask, style_mask = single_mask("mask", mask), single_mask("style_mask", style_mask)
        part = (1.0 if blend is None else blend) / len(images)
        terms = [
            make_term(image, weight=weight, target_mask=mask, style_mask=style_mask, blend=part) for image in images
        ]
        return (chain(style_losses, terms),)


class FusionStyleGlobalStyleLoss(_StyleLoss):
    SEARCH_ALIASES = [*PACK_ALIASES, "Gram matrix", "global style", "style loss"]
    DESCRIPTION = (
        "Global style loss (Gatys et al.): matches the Gram matrices of the style image's VGG features, i.e. its "
        "colours and texture statistics over the whole image. Chain it with a Local Patch Loss."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "style_image": STYLE_IMAGE,
                "weight": (
                    "FLOAT",
                    {
                        "default": _GLOBAL.weight,
                        "min": 0.0,
                        "max": 10000.0,
                        "step": 0.1,
                        "tooltip": "a1, the weight of the Gram loss. Higher: more of the style's colours and "
                        "textures; 0 switches it off.",
                    },
                ),
                "layers": (
                    "STRING",
                    {
                        "default": ",".join(GLOBAL_LAYERS),
                        "tooltip": "Comma-separated VGG layers whose Gram matrices are matched (the paper used "
                        f"{','.join(PAPER_GLOBAL_LAYERS)}; Fused Style Optimize's preset 'paper' sets them back). "
                        f"Valid: {', '.join(LAYERS)}.",
                    },
                ),
                "style_scale": STYLE_SCALE,
            },
            "optional": OPTIONAL,
        }

    def add(self, style_image, weight, layers, style_scale, mask=None, style_mask=None, style_losses=None, blend=None):
        term = partial(GlobalStyle, layers=parse_layers("layers", layers), scale=style_scale)
        return self.chained(term, style_image, weight, mask, style_mask, style_losses, blend)


class FusionStyleLocalPatchLoss(_StyleLoss):
    SEARCH_ALIASES = [*PACK_ALIASES, "Li Wand", "patch loss", "local style", "style loss"]
    DESCRIPTION = (
        "Local patch loss (Li & Wand, MRF): pulls every small patch of the output's VGG features toward its most "
        "similar patch of the style image, which keeps local structure such as brush strokes."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "style_image": STYLE_IMAGE,
                "weight": (
                    "FLOAT",
                    {
                        "default": _LOCAL.weight,
                        "min": 0.0,
                        "max": 100.0,
                        # A small step, so the widget keeps values like 0.000025 (it rounds to the step's decimals).
                        "step": 0.000001,
                        "round": False,
                        "tooltip": "a2, the weight of the patch loss (the paper's 1e-4, which Fused Style Optimize's "
                        "preset 'paper' sets). Higher: more of the style's local structure; 0 switches it off.",
                    },
                ),
                "layer": (
                    LAYERS,
                    {"default": _LOCAL.layer, "tooltip": "The VGG layer whose feature patches are matched."},
                ),
                "patch_size": (
                    "INT",
                    {
                        "default": _LOCAL.patch_size,
                        "min": 1,
                        "max": 15,
                        "tooltip": "Patch width in feature positions (at relu3_1 one position is 4 pixels).",
                    },
                ),
                "stride": (
                    "INT",
                    {
                        "default": _LOCAL.stride,
                        "min": 1,
                        "max": 15,
                        "tooltip": "Step between patches; above 1 is faster and coarser.",
                    },
                ),
                "style_scale": STYLE_SCALE,
            },
            "optional": OPTIONAL,
        }

    def add(
        self,
        style_image,
        weight,
        layer,
        patch_size,
        stride,
        style_scale,
        mask=None,
        style_mask=None,
        style_losses=None,
        blend=None,
    ):
        term = partial(LocalStyle, layer=layer, patch_size=patch_size, stride=stride, scale=style_scale)
        return self.chained(term, style_image, weight, mask, style_mask, style_losses, blend)
