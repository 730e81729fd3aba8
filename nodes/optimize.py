"""Fused Style Optimize: the image that minimises the chained style losses plus the content loss."""

from __future__ import annotations

import contextlib

import torch

from ..fusion_core.choices import chosen_fields, missing_layers, preset_terms, settings_for
from ..fusion_core.config import (
    COLOR_MODES,
    INITS,
    MATCH_METRICS,
    MATCHER_NAMES,
    OPTIMIZERS,
    PRESETS,
    Settings,
    defaults,
)
from ..fusion_core.errors import Cancelled, FusionError
from ..fusion_core.flow import flow_estimator
from ..fusion_core.images import to_pil
from ..fusion_core.memory import run_bytes
from ..fusion_core.stylize import stylize
from ..fusion_core.vgg import loss_layers
from ..fusion_core.video import stylize_frames
from . import comfy
from .common import CATEGORY, LAYERS, PACK_ALIASES, STYLE_LOSSES
from .temporal import TEMPORAL, Temporal
from .tensors import join_images, split_images

_DEFAULTS = defaults(Settings)
PREVIEW_EVERY = 5  # iterations between live previews on the node
# "auto": the optimiser's own step size (fusion_core's learning_rate=None); "manual": the learning_rate widget's.
LEARNING_RATE_MODES = ["auto", "manual"]
MATCHER_HELP = {  # for the tooltip; the choices are fusion_core.config.MATCHER_NAMES
    "exact": "compares it with every style patch",
    "fast": "searches a low-dimensional projection first: far cheaper on large images, nearly as exact",
}


class FusionStyleFusedOptimize:
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Paints the content image in the style of the chained style losses: optimises the image's pixels with "
        "L-BFGS (or Adam), coarse to fine, against the fused global (Gram) + local (patch) style losses and a "
        "content loss."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The stylised image(s), at the content image's aspect ratio, longest side = size.",)
    FUNCTION = "optimize"
    SEARCH_ALIASES = [*PACK_ALIASES, "optimize", "stylize", "L-BFGS"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vgg": ("VGG_MODEL", {"tooltip": "The feature network, from Load VGG."}),
                "content_image": (
                    "IMAGE",
                    {"tooltip": "The photo to stylise. A batch gives a batch of results, each made on its own."},
                ),
                "style_losses": (STYLE_LOSSES, {"tooltip": "The style losses, from Global/Local style loss nodes."}),
                "content_weight": (
                    "FLOAT",
                    {
                        "default": _DEFAULTS.content_weight,
                        "min": 0.0,
                        "max": 10000.0,
                        "step": 0.1,
                        "tooltip": "a3, the weight of the content loss (the paper's 20). Higher: closer to the content "
                        "image.",
                    },
                ),
                "content_layer": (
                    LAYERS,
                    {
                        "default": _DEFAULTS.content_layer,
                        "tooltip": "The VGG layer the content is compared at: relu4_2 (Gatys et al.'s) keeps the "
                        "photo's forms and leaves its textures to the style; the paper's relu3_1 holds finer detail "
                        "and paints less.",
                    },
                ),
                "size": (
                    "INT",
                    {
                        "default": _DEFAULTS.size,
                        "min": 64,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "Longest side of the output in pixels. Above what fits in memory, levels are "
                        "evaluated in tiles (see tile).",
                    },
                ),
                "levels": (
                    "INT",
                    {
                        "default": _DEFAULTS.levels,
                        "min": 1,
                        "max": 6,
                        "tooltip": "Coarse-to-fine pyramid levels, each twice the size of the one before.",
                    },
                ),
                "iterations": (
                    "INT",
                    {
                        "default": _DEFAULTS.iterations,
                        "min": 1,
                        "max": 5000,
                        "tooltip": "Optimiser iterations per level before the last, which has final_iterations (Adam "
                        "needs more than L-BFGS).",
                    },
                ),
                "init": (
                    list(INITS),
                    {
                        "default": _DEFAULTS.init,
                        "tooltip": "Where the optimisation starts: 'recolored', the content image in the style's "
                        "colours (clean, keeps the photo's structure); 'content', the content image as it is "
                        "(keeps more of its colours); 'random', noise (the paper; needs more iterations and leaves "
                        "more speckle).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": _DEFAULTS.seed,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "Seed of the random start image; the same seed gives the same result.",
                    },
                ),
            },
            "optional": {
                "color": (
                    list(COLOR_MODES),
                    {
                        "default": _DEFAULTS.color,
                        "tooltip": "Colours of the result: 'none' takes the style's; 'luminance' transfers the style "
                        "on brightness only and keeps the content's colours; 'histogram' recolours the styles to the "
                        "content's palette first.",
                    },
                ),
                "optimizer": (
                    list(OPTIMIZERS),
                    {
                        "default": _DEFAULTS.optimizer,
                        "tooltip": "'lbfgs' (the paper; converges in fewer iterations) or 'adam' (less memory, "
                        "needs more iterations).",
                    },
                ),
                "learning_rate_mode": (
                    LEARNING_RATE_MODES,
                    {
                        "default": "auto",
                        "tooltip": "'auto': the optimiser's own step size, 1 for L-BFGS and 0.02 for Adam (the image "
                        "being in 0..1); 'manual': the learning_rate below.",
                    },
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0001,
                        "max": 10.0,
                        "step": 0.001,
                        "tooltip": "The optimiser's step size when learning_rate_mode is 'manual' (ignored on 'auto').",
                    },
                ),
                "tv_weight": (
                    "FLOAT",
                    {
                        "default": _DEFAULTS.tv_weight,
                        "min": 0.0,
                        "max": 10000.0,
                        "step": 0.1,
                        "tooltip": "Total-variation weight: smooths pixel noise (try 5 to 50). 0, as in the "
                        "paper, switches it off.",
                    },
                ),
                "matcher": (
                    list(MATCHER_NAMES),
                    {
                        "default": _DEFAULTS.matcher,
                        "tooltip": "How the local loss finds each output patch's nearest style patch: "
                        + "; ".join(f"'{name}' {MATCHER_HELP.get(name, '')}".strip() for name in MATCHER_NAMES)
                        + ".",
                    },
                ),
                "rematch_every": (
                    "INT",
                    {
                        "default": _DEFAULTS.rematch_every,
                        "min": 1,
                        "max": 100,
                        "tooltip": "Search the nearest style patches every n-th iteration and reuse the matches in "
                        "between; 1 searches at every iteration, higher is faster.",
                    },
                ),
                "mixed_precision": (
                    "BOOLEAN",
                    {
                        "default": _DEFAULTS.mixed_precision,
                        "tooltip": "Run the VGG pass and the patch search in 16-bit floats where the hardware has "
                        "them (float16 on NVIDIA GPUs, bfloat16 on CPUs with AVX512-BF16 or AMX; ~1.7x faster per "
                        "iteration on such a CPU, same quality). Losses and the image stay float32. Off: float32 "
                        "throughout.",
                    },
                ),
                "preset": (
                    list(PRESETS),
                    {
                        "default": "default",
                        "tooltip": "'paper': the paper's own set-up: init random, tv_weight 0, match_content 0, "
                        "match_metric correlation, content_weight 20, content_layer relu3_1, the local loss's weight "
                        "1e-4, 100 iterations on "
                        "every level, its Gram layers and the local loss on every pyramid level, for the inputs left "
                        "at their defaults. "
                        "'default' uses the inputs as they are, with the local loss only on levels where the style "
                        "image is at least 256 px.",
                    },
                ),
                "tile": (
                    "INT",
                    {
                        "default": _DEFAULTS.tile,
                        "min": 0,
                        "max": 16384,
                        "step": 64,
                        "tooltip": "Large prints: evaluate each level in tiles of at most this many pixels. The "
                        "result is the same as untiled (no seams). The shallow layers run in tiles and the deep ones, "
                        "which hold little memory, on the whole image where they fit: ~1.2x the untiled time per "
                        "pixel (every layer in tiles, for the largest prints: ~1.5-2x). 0: tiles only when a level "
                        "would not fit in the device's free memory; the console says how many tiles and how long an "
                        "L-BFGS history each level uses.",
                    },
                ),
                "final_iterations": (
                    "INT",
                    {
                        "default": _DEFAULTS.final_iterations,
                        "min": 0,
                        "max": 10000,
                        "tooltip": "Iterations at the last, largest level; 0: the same as iterations. The last level "
                        "costs 4x the one before it, so fewer here saves most of a large print's time.",
                    },
                ),
                "max_memory_gb": (
                    "FLOAT",
                    {
                        "default": _DEFAULTS.max_memory,
                        "min": 0.0,
                        "max": 1024.0,
                        "step": 0.5,
                        "tooltip": "The most memory this run may leave the process holding on its device, in GB "
                        "(on a CPU: ComfyUI's whole process, its other models included; on a GPU: what torch holds "
                        "there). Levels that would not fit are evaluated in tiles, with a shorter L-BFGS history. 0: "
                        "what the device has free.",
                    },
                ),
                "match_content": (
                    "FLOAT",
                    {
                        "default": _DEFAULTS.match_content,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "How much the local loss looks at the content photo when it picks each patch's "
                        "nearest style patch: 0 looks at the result alone (the paper), which can paint a portrait's "
                        "eyes into a landscape's sky or water; 1 at the photo alone. The preset 'paper' sets 0.",
                    },
                ),
                "match_metric": (
                    list(MATCH_METRICS),
                    {
                        "default": _DEFAULTS.match_metric,
                        "tooltip": "What 'nearest' means when the local loss picks each patch's style patch. "
                        "'distance': nearest in feature distance, so faint texture (grass, water) is matched to "
                        "the painting's faint strokes. 'correlation' (the paper): the same pattern at any strength, "
                        "which can pull faint texture to the painting's most contrasted detail (a pupil, a nostril) "
                        "and paint it there at full strength. The preset 'paper' sets 'correlation'.",
                    },
                ),
                "temporal": (
                    TEMPORAL,
                    {
                        "tooltip": "For video, from Temporal Consistency: the content batch is a clip's frames, "
                        "stylised in order, each from the previous result moved along the optical flow."
                    },
                ),
            },
        }

    def optimize(
        self,
        vgg,
        content_image,
        style_losses,
        content_weight,
        content_layer,
        size,
        levels,
        iterations,
        init,
        seed,
        color=None,
        optimizer=None,
        learning_rate_mode=None,
        learning_rate=None,
        tv_weight=None,
        matcher=None,
        rematch_every=None,
        mixed_precision=None,
        preset=None,
        tile=None,
        final_iterations=None,
        max_memory_gb=None,
        match_content=None,
        match_metric=None,
        temporal=None,
    ):
        inputs = dict(
            content_weight=content_weight,
            content_layer=content_layer,
            size=size,
            levels=levels,
            iterations=iterations,
            init=init,
            seed=seed,
            color=color or _DEFAULTS.color,
            optimizer=optimizer or _DEFAULTS.optimizer,
            learning_rate=learning_rate if learning_rate_mode == "manual" else None,  # None: the optimiser's own
            tv_weight=_DEFAULTS.tv_weight if tv_weight is None else tv_weight,
            matcher=matcher or _DEFAULTS.matcher,
            rematch_every=rematch_every or _DEFAULTS.rematch_every,
            mixed_precision=_DEFAULTS.mixed_precision if mixed_precision is None else bool(mixed_precision),
            preview_every=PREVIEW_EVERY,
            tile=tile or _DEFAULTS.tile,
            final_iterations=_DEFAULTS.final_iterations if final_iterations is None else final_iterations,
            max_memory=max_memory_gb or _DEFAULTS.max_memory,
            match_content=_DEFAULTS.match_content if match_content is None else match_content,
            match_metric=match_metric or _DEFAULTS.match_metric,
        )
        # a widget changed from its default is the user's choice and wins over the preset; one left alone, the preset's
        settings = settings_for(preset or "default", chosen_fields(inputs))
        style_losses = preset_terms(preset or "default", style_losses or [])  # a1, a2 likewise
        check_layers(vgg, style_losses, settings)  # before any work: name the widget that asks for a missing layer
        contents = split_images("content_image", content_image)
        steps = settings.total_steps()
        if temporal is not None:
            return (self._clip(vgg, contents, style_losses, settings, temporal, content_image),)
        update = comfy.progress_bar(steps * len(contents))
        device = comfy.torch_device()
        comfy.free_memory(_needed_bytes(vgg, content_image, style_losses, settings), device)
        results = []
        with _on_device(vgg, device):
            for i, content in enumerate(contents):

                def on_progress(p, done=i * steps):
                    if p.iteration == 1 and p.tiles > 1:
                        comfy.log(f"Fused Style Optimize: level {p.level}/{p.levels}: {p.plan()}")
                    update(done + p.step, None if p.image is None else to_pil(p.image))

                try:
                    image = stylize(
                        vgg, content, style_losses, settings, on_progress=on_progress, should_stop=comfy.should_stop
                    )
                except FusionError as error:
                    if len(contents) == 1:
                        raise
                    raise FusionError(f"content_image[{i}] (of a batch of {len(contents)}): {error}") from None
                results.append(image)
        return (join_images(results),)

    def _clip(self, vgg, frames, style_losses, settings: Settings, temporal: Temporal, content_image):
        """The content batch as a clip, stylised in order (fusion_core.video): the progress bar counts every
        frame's iterations, the preview shows the frame being made."""
        video = temporal.video
        # a frame's iterations: the whole run for a still (independent frames, or the first without a previous
        # chunk), else the later frames' count
        counts = [
            settings.total_steps()
            if video.independent or (i == 0 and temporal.previous is None)
            else video.later_iterations
            for i in range(len(frames))
        ]
        starts = [sum(counts[:i]) for i in range(len(frames))]
        update = comfy.progress_bar(sum(counts))
        device = comfy.torch_device()
        comfy.free_memory(_needed_bytes(vgg, content_image, style_losses, settings), device)
        flow = None
        needs_flow = not video.independent and (len(frames) > 1 or temporal.previous is not None)
        if needs_flow:
            flow = flow_estimator(temporal.flow, models_dirs=comfy.models_dirs(), download=True, device=str(device))

        def on_progress(index: int, count: int, p) -> None:
            if p.iteration == 1 and p.level == 1:
                comfy.log(f"Fused Style Optimize: frame {index + 1}/{count}")
            update(starts[index] + p.step, None if p.image is None else to_pil(p.image))

        results = []
        with _on_device(vgg, device):
            for image in stylize_frames(
                vgg,
                frames,
                style_losses,
                settings,
                video,
                flow=flow,
                previous=temporal.previous,
                on_progress=on_progress,
                should_stop=comfy.should_stop,
            ):
                results.append(image)
        return join_images(results)


@contextlib.contextmanager
def _on_device(vgg, device: torch.device):
    """The network on ``device`` for a run: a cancel becomes ComfyUI's interruption, and afterwards the network goes
    back to ComfyUI's offload device and the cache is emptied, whatever happened."""
    try:
        # Moved outside inference mode so the weights stay usable by autograd on the new device.
        with torch.inference_mode(False):
            vgg.to(device)
        yield
    except Cancelled as error:
        comfy.raise_interrupted(error)
    finally:
        with torch.inference_mode(False):
            vgg.to(comfy.offload_device())
        comfy.soft_empty_cache()


def check_layers(vgg, style_losses, settings: Settings) -> None:
    """Every layer the run needs must be in the loaded network (a VGG16 has no relu3_4, relu4_4, relu5_4): else
    a FusionError naming the node and widget that asks for it, and the layers the network has."""
    problems = []
    for where, layers in missing_layers(vgg, style_losses or [], settings):
        if where == "content_layer":
            widget = "Fused Style Optimize: content_layer"
        elif where == "global_layers":
            widget = "Fused Style Optimize: preset 'paper' (its Gram layers)"
        else:
            i = int(where[where.index("[") + 1 : where.index("]")])
            node = "Global Style Loss (Gram)" if where.endswith(".layers") else "Local Patch Loss (MRF)"
            widget = f"{node}, style_losses[{i}]: {where.rsplit('.', 1)[1]}"
        problems.append(f"{widget} asks for {', '.join(map(repr, layers))}")
    if problems:
        has = ", ".join(loss_layers(vgg.arch))
        raise FusionError(
            f"{'; '.join(problems)}, which the loaded {vgg.arch.upper()} (from Load VGG) does not have. "
            f"Its layers: {has}"
        )


def _needed_bytes(vgg, content_image, style_losses, settings: Settings) -> int:
    """fusion_core's figure for one run (memory.run_bytes), for ComfyUI to make room on the device."""
    try:
        return run_bytes(vgg, tuple(content_image.shape[1:3]), style_losses, settings)
    except (ValueError, FusionError):  # e.g. a budget too small: stylize() reports it clearly
        return sum(t.numel() * t.element_size() for t in vgg.parameters())
