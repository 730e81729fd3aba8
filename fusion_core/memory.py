"""Estimate the memory a run needs before starting it, and refuse runs that cannot fit.

The estimate counts what the largest pyramid level holds at once: what the VGG pass keeps for its
backward pass (the activations the losses use, whole; one byte per other activation, see
``lean_backward.py``), a few gradients of the largest activation in the backward pass, the style
activations kept as targets, the nearest-patch search's score block, and the optimiser state. Each at its
own size: under mixed precision the pass's activations and gradients are 16-bit, the losses' copies of the
layers they use float32. It is deliberately a little generous (at 1024 px it is ~1.2x the tensor memory
measured in BENCHMARKS.md).

The memory available is what the device could still give the run: on CUDA the free memory plus the blocks
PyTorch's caching allocator holds but no tensor uses (after other ComfyUI work those can be gigabytes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import LocalStyle, Settings, StyleTerm
from .errors import FusionError
from .geometry import feature_shape, style_shape
from .lean_backward import keeps_output
from .matching import DEFAULT_MAX_SCORES
from .precision import mixed_dtype
from .vgg import VGGFeatures

_FLOAT = 4


def _activation_elements(vgg: VGGFeatures, shape: tuple[int, int], layers: set[str]) -> tuple[int, int, int, int]:
    """For one pass to the deepest of ``layers``: elements the backward pass keeps whole, elements it keeps as
    one-byte signs, elements of the returned layers, and the largest activation."""
    names = vgg.names[: max(vgg.names.index(n) for n in layers) + 1]
    h, w = shape
    whole = signs = returned = 0
    largest = 3 * h * w
    conv = 0
    for i, name in enumerate(names):
        if name.startswith("conv"):
            channels = vgg.convs[conv].out_channels
            conv += 1
            size = channels * h * w
            largest = max(largest, size)
            if name in layers or keeps_output(names, i, layers):  # a returned conv output: unfused
                whole += size
            else:
                signs += size
        elif name.startswith("pool"):
            h, w = h // 2, w // 2
            signs += channels * h * w if vgg.pooling == "max" else 0  # which input was the largest
        if name in layers:
            returned += channels * h * w
    return whole, signs, returned, largest


def kept_bytes(vgg: VGGFeatures, shape: tuple[int, int], layers: set[str], half: torch.dtype | None) -> int:
    """Bytes the VGG pass to ``layers`` keeps for its backward pass at input ``shape``: whole activations at the
    pass's precision (``half``, or float32 for None), one byte per other activation, and under mixed precision
    the float32 copies of the returned layers that the losses use."""
    whole, signs, returned, _ = _activation_elements(vgg, shape, layers)
    if half is None:
        return whole * _FLOAT + signs
    return whole * (torch.finfo(half).bits // 8) + signs + returned * _FLOAT


def _layers(styles: Sequence[StyleTerm], settings: Settings) -> set[str]:
    layers = {settings.content_layer}
    for style in styles:
        layers.update(style.feature_layers())
    return layers


def _vectors(settings: Settings, history: int) -> int:
    """Image-sized float32 vectors the optimiser holds, with the image and its gradient."""
    # L-BFGS: history + 1 pairs of (y, s), direction, previous gradient, q; plus image and gradient. Adam: 2 moments.
    return 2 * (history + 1) + 5 if settings.optimizer == "lbfgs" else 4


def estimate_bytes(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    styles: Sequence[StyleTerm],
    settings: Settings,
    history: int | None = None,
) -> int:
    """Peak bytes for optimising an output of ``shape`` (the last, largest level) whole, with an L-BFGS
    ``history`` (default ``settings.history_size``)."""
    layers = _layers(styles, settings)
    half = mixed_dtype(vgg.device, settings.mixed_precision)
    pass_bytes = _FLOAT if half is None else torch.finfo(half).bits // 8
    _, _, returned, largest = _activation_elements(vgg, shape, layers)
    pixels = 3 * shape[0] * shape[1]
    vectors = _vectors(settings, settings.history_size if history is None else history)
    # Optimising: the pass's kept activations, a few gradients of the largest size in the backward pass, the
    # optimiser, a score block.
    optimising = (
        kept_bytes(vgg, shape, layers, half)
        + 3 * largest * pass_bytes
        + (vectors * pixels + DEFAULT_MAX_SCORES) * _FLOAT
    )
    # Before that, each style image's pass in float32 (the two largest activations at once) and the layers cached
    # from it.
    setting_up, targets = 0, returned // 2 * _FLOAT  # the content target and the patch loss's maps
    for style in {id(style.image): style for style in styles}.values():
        size = style_shape(tuple(style.image.shape[-2:]), shape, style.scale)
        _, _, style_returned, style_largest = _activation_elements(vgg, size, layers)
        setting_up = max(setting_up, (2 * style_largest + style_returned) * _FLOAT)
    return max(optimising, setting_up) + targets


def tiled_bytes(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    styles: Sequence[StyleTerm],
    settings: Settings,
    tile: int,
    history: int,
) -> int:
    """Peak bytes for optimising an output of ``shape`` in tiles of ``tile`` px (tiling.py): the image-sized
    vectors, the targets kept whole (the content's map, each patch loss's style map, its search's projection and
    matches), and the largest tile's evaluation as ``estimate_bytes`` counts a whole image's."""
    from .tiling import TilePlan, patch_reach  # tiling builds on the losses; the estimate needs only its plan

    layers = _layers(styles, settings)
    half = mixed_dtype(vgg.device, settings.mixed_precision)
    pass_bytes = _FLOAT if half is None else torch.finfo(half).bits // 8
    extra = dict.fromkeys(layers, (0, 0))
    for style in styles:
        if isinstance(style, LocalStyle):
            extra[style.layer] = patch_reach(style.patch_size, style.stride)
    crops = [tile.crop for tile in TilePlan(vgg.names, shape, extra, tile).tiles]
    crop = max(((c[0].stop - c[0].start, c[1].stop - c[1].start) for c in crops), key=math.prod)
    _, _, _, crop_largest = _activation_elements(vgg, crop, layers)
    local_layers = {settings.content_layer} | {s.layer for s in styles if isinstance(s, LocalStyle)}
    crop_local = _activation_elements(vgg, crop, local_layers)[2]
    pixels = 3 * shape[0] * shape[1]
    content = _activation_elements(vgg, shape, {settings.content_layer})[2]
    whole = _vectors(settings, history) * pixels * _FLOAT + content * _FLOAT
    searches, setting_up = 0, 0
    for style in styles:
        size = style_shape(tuple(style.image.shape[-2:]), shape, style.scale)
        style_crop = (min(tile, size[0]), min(tile, size[1]))
        _, _, returned, largest = _activation_elements(vgg, style_crop, layers)
        setting_up = max(setting_up, (2 * largest + returned) * _FLOAT)
        if isinstance(style, LocalStyle):
            channels, (h, w) = _channels(vgg, style.layer), feature_shape(size, style.layer)
            queries = math.prod(feature_shape(shape, style.layer))
            # the style map, its projection (64 values per patch) and squared norms, the matches and candidates
            searches += (channels + 64 + 4) * h * w * _FLOAT + queries * (2 + 9) * 8
    one_tile = (
        kept_bytes(vgg, crop, layers, half)
        + 3 * crop_largest * pass_bytes  # gradients in the backward pass
        + 3 * crop_local * _FLOAT  # the window's targets and differences on the content and patch layers
        + DEFAULT_MAX_SCORES * _FLOAT
    )
    return whole + searches + max(one_tile, setting_up)


def _channels(vgg: VGGFeatures, layer: str) -> int:
    convs = sum(1 for name in vgg.names[: vgg.names.index(layer) + 1] if name.startswith("conv"))
    return vgg.convs[convs - 1].out_channels


@dataclass(frozen=True)
class LevelPlan:
    """How a level is evaluated: whole (``tile`` 0) or in tiles of ``tile`` px, and the L-BFGS history it keeps."""

    tile: int
    history: int


MIN_HISTORY = 5  # the automatic choice shrinks the tiles before the L-BFGS history below this


def plan_level(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    styles: Sequence[StyleTerm],
    settings: Settings,
    available: int | None = None,
) -> LevelPlan:
    """Whole or tiled, and the history, for optimising a canvas of ``shape`` in the memory ``available`` (default:
    what the device has free). ``settings.tile`` > 0 asks for tiles of that size; 0 tiles only a level that would
    not fit whole, in the largest tiles that leave the L-BFGS history at least MIN_HISTORY (or
    ``settings.history_size`` if smaller), and shrinks the history only when the smallest tiles need it."""
    available = available_bytes(vgg.device) if available is None else available
    wanted = settings.history_size if settings.optimizer == "lbfgs" else 0
    budget = None if available is None else 0.9 * available

    def history_for(tile: int) -> int:
        """The longest history (<= wanted) that fits with ``tile`` (0: whole), or -1."""
        for history in range(wanted, -1, -1):
            needed = (
                estimate_bytes(vgg, shape, styles, settings, history)
                if tile == 0
                else tiled_bytes(vgg, shape, styles, settings, tile, history)
            )
            if budget is None or needed <= budget:
                return history
            if settings.optimizer != "lbfgs":
                break
        return -1

    if settings.tile > 0:
        history = history_for(settings.tile)
        if history >= min(1, wanted):
            return LevelPlan(settings.tile, history)
        _refuse(vgg, shape, styles, settings, available, settings.tile)
    if history_for(0) == wanted:
        return LevelPlan(0, wanted)
    sizes, size = [], max(shape) - 64
    while size >= MIN_TILE:  # from tiles of nearly the whole canvas down, ~15% at a time
        sizes.append(size // 64 * 64)
        size = int(size * 0.85)
    for size in sizes:
        history = history_for(size)
        if history >= min(MIN_HISTORY, wanted):
            return LevelPlan(size, history)
    smallest = history_for(sizes[-1]) if sizes else -1
    if smallest >= min(1, wanted):
        return LevelPlan(sizes[-1], smallest)
    _refuse(vgg, shape, styles, settings, available, sizes[-1] if sizes else MIN_TILE)
    raise AssertionError  # _refuse raises


MIN_TILE = 384  # the smallest automatic tile: smaller ones spend most of their time on the halo (tiling.py)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``, or None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "mps":
        limit = getattr(torch.mps, "recommended_max_memory", None)  # torch >= 2.5
        if limit is None:
            return None
        return max(0, int(limit() - torch.mps.current_allocated_memory()))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_memory(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    styles: Sequence[StyleTerm],
    settings: Settings,
    available: int | None = None,
) -> LevelPlan:
    """The plan for a canvas of ``shape`` (``plan_level``); a FusionError with the estimate and a size that would fit
    where not even tiles of the smallest size would."""
    return plan_level(vgg, shape, styles, settings, available)


def _refuse(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    styles: Sequence[StyleTerm],
    settings: Settings,
    available: int,
    tile: int,
) -> None:
    needed = tiled_bytes(vgg, shape, styles, settings, tile, 1 if settings.optimizer == "lbfgs" else 0)
    fits = max(64, int(settings.size * math.sqrt(0.9 * available / needed)) // 64 * 64)
    advice = f"use a smaller size (about {fits} px would fit)"
    if settings.optimizer == "lbfgs":
        advice += " or optimizer 'adam'"
    raise FusionError(
        f"size: an output of {shape[1]}x{shape[0]} px needs about {needed / 2**30:.1f} GiB even in tiles of {tile} px, "
        f"but only {available / 2**30:.1f} GiB is free on {vgg.device}; {advice}"
    )
