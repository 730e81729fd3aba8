"""The targets of one pyramid level: which style terms it uses (``styles_at_level``) and its weighted terms with their
targets computed at its size once (``build_criterion``: content features, style Grams, style patch banks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LOCAL_MIN_STYLE_SIDE, GlobalStyle, LocalStyle, Settings, StyleTerm
from .criterion import Criterion, Term
from .errors import FusionError
from .functional import gram_matrix, patch_weights
from .geometry import feature_shape, style_shape, with_margin
from .images import mirror_pad, resize, resize_mask
from .losses import ContentLoss, GramLoss, PatchLoss
from .precision import full_float32, mixed_dtype
from .tiling import tiled_maps
from .vgg import VGGFeatures


def styles_at_level(
    styles: Sequence[StyleTerm], settings: Settings, shape: tuple[int, int], last: bool
) -> list[StyleTerm]:
    """The style terms used at a level of output ``shape``.

    Unless ``settings.local_all_levels``, the local terms start at the first level whose style image is
    LOCAL_MIN_STYLE_SIDE px on its longest side (always at the last level): below that a patch of the local
    loss (32 px for 3x3 patches on relu3_1) is a whole motif of the style, a face or a hat, which the
    nearest-patch pull would paste into the photo's sky or water. The coarse levels, which lay out colour and
    large forms, are left to the global and content terms.
    """
    if settings.local_all_levels or last:
        return list(styles)
    return [
        style
        for style in styles
        if not isinstance(style, LocalStyle) or round(max(shape) * style.scale) >= LOCAL_MIN_STYLE_SIDE
    ]


def build_criterion(
    vgg: VGGFeatures,
    content: Tensor,
    styles: Sequence[StyleTerm],
    settings: Settings,
    shape: tuple[int, int],
    *,
    margin: int = 0,
    tile: int = 0,
) -> Criterion:
    """Targets for one level: content features, style Grams and style patch banks at this size.

    With a ``margin``, the criterion scores the image of ``shape`` with that mirrored border around it (see
    ``geometry.border_margin``): the content and the target masks get the same border. With a ``tile`` (px), the
    content and style images go through the network in tiles of that size (``tiling.tiled_maps``), so no
    activation of a whole image is held but the targets themselves.
    """
    canvas = with_margin(shape, margin)
    device = content.device

    def on_canvas(mask: Tensor | None) -> Tensor | None:
        if mask is None or margin == 0:
            return mask
        return F.pad(resize_mask(mask, shape)[None, None], (margin,) * 4, mode="replicate")[0, 0]

    with torch.no_grad(), full_float32(mixed_dtype(device, settings.mixed_precision) is None):
        terms: list[Term] = []
        map_cache: dict[tuple[int, float], dict[str, Tensor]] = {}

        def style_image(style: StyleTerm) -> Tensor:
            return resize(style.image.to(device), style_shape(tuple(style.image.shape[-2:]), shape, style.scale))

        def style_maps(style: StyleTerm, layers: Sequence[str]) -> dict[str, Tensor]:
            # Each style image is resized and run through the network once per level and scale.
            cached = map_cache.setdefault((id(style.image), style.scale), {})
            missing = [layer for layer in layers if layer not in cached]
            if missing:
                cached.update(_features(vgg, style_image(style), missing, tile))
            return {layer: cached[layer] for layer in layers}

        def style_grams(style: StyleTerm, masks: dict[str, Tensor | None]) -> dict[str, Tensor]:
            if tile:
                return tiled_maps(vgg, style_image(style), tile, grams=masks)[1]
            features = style_maps(style, list(masks))
            return {layer: gram_matrix(features[layer], mask) for layer, mask in masks.items()}

        def style_energy(style: StyleTerm, layer: str) -> Tensor:
            """The style's mean squared activation on ``layer``: the trace of its Gram matrix over the channels."""
            cached = map_cache.get((id(style.image), style.scale), {})
            if tile and layer not in cached:
                gram = style_grams(style, {layer: None})[layer][0]
                return gram.diagonal().sum() / gram.shape[0]
            return style_maps(style, [layer])[layer].square().mean()

        content_maps: dict[str, Tensor] = {}

        def content_map(layer: str) -> Tensor:
            """The content image's map on ``layer`` (the content term's target, the patch search's guide)."""
            if layer not in content_maps:
                content_maps[layer] = _features(vgg, mirror_pad(resize(content, shape), margin), [layer], tile)[layer]
            return content_maps[layer]

        active = [style for style in styles if style.weight > 0]
        for style in active:
            layers = style.feature_layers()
            size = style_shape(tuple(style.image.shape[-2:]), shape, style.scale)
            target_masks = _masks_at(
                on_canvas(style.target_mask), {l: feature_shape(canvas, l) for l in layers}, device
            )
            style_masks = _masks_at(style.style_mask, {l: feature_shape(size, l) for l in layers}, device)
            if isinstance(style, GlobalStyle):
                grams = style_grams(style, style_masks)
                # One module per layer (the loss is their mean), each evaluated as soon as its layer exists.
                for layer in layers:
                    gram = GramLoss({layer: grams[layer]}, {layer: target_masks[layer]})
                    terms.append(Term("global", style.weight / len(layers), gram))
            else:
                features = style_maps(style, layers)
                guide = content_map(style.layer) if settings.match_content > 0 else None
                patch_loss = _patch_loss(style, features, style_masks, target_masks, settings, guide)
                terms.append(Term("local", style.weight, patch_loss))
        if settings.content_weight > 0:
            layer = settings.content_layer
            target = content_map(layer)
            # The content distance's unit: the styles' mean squared activation on its layer (losses.py).
            energies = [style_energy(style, layer) for style in active]
            energy = float(torch.stack(energies).mean() if energies else target.square().mean())
            terms.append(Term("content", settings.content_weight, ContentLoss(layer, target, energy)))
        return Criterion(vgg, terms, settings.tv_weight, settings.mixed_precision)


def _patch_loss(
    style: LocalStyle,
    features: dict[str, Tensor],
    style_masks: dict[str, Tensor | None],
    target_masks: dict[str, Tensor | None],
    settings: Settings,
    guide: Tensor | None,
) -> PatchLoss:
    layer = style.layer
    eligible = weights = None
    if style_masks[layer] is not None:
        eligible = patch_weights(style_masks[layer], style.patch_size, style.stride) >= 0.5
        if not eligible.any():
            raise FusionError("style_mask: the region is too small to hold one style patch at this size")
    if target_masks[layer] is not None:
        weights = patch_weights(target_masks[layer], style.patch_size, style.stride)
    return PatchLoss(
        layer,
        features[layer],
        style.patch_size,
        style.stride,
        style_eligible=eligible,
        target_weights=weights,
        matcher=settings.matcher,
        metric=settings.match_metric,
        guide=guide,
        guide_share=settings.match_content,
    )


def _features(vgg: VGGFeatures, image: Tensor, layers: Sequence[str], tile: int) -> dict[str, Tensor]:
    """``vgg(image, layers)``, in tiles of ``tile`` px when one is given."""
    return tiled_maps(vgg, image, tile, layers)[0] if tile else vgg(image, layers)


def _masks_at(
    mask: Tensor | None, shapes: dict[str, tuple[int, int]], device: torch.device
) -> dict[str, Tensor | None]:
    if mask is None:
        return dict.fromkeys(shapes)
    return {layer: resize_mask(mask, shape).to(device) for layer, shape in shapes.items()}
