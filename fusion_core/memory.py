"""Estimate the memory a run needs before starting it, and refuse runs that cannot fit.

The estimate counts what the largest pyramid level holds at once: what the VGG pass keeps for its
backward pass (the activations the losses use, whole; one byte per other activation, see
``lean_backward.py``), a few gradients of the largest activation in the backward pass, the style
activations kept as targets, the nearest-patch search's score block, and the optimiser state. Each at its
own size: under mixed precision the pass's activations and gradients are 16-bit, the losses' copies of the
layers they use float32. It is deliberately a little generous (at 1024 px it is ~1.2x the tensor memory
measured in BENCHMARKS.md).

The memory available is what the device could still give the run: on CUDA the free memory plus the blocks
PyTorch's caching allocator holds but no tensor uses (after other ComfyUI work those can be gigabytes); on a CPU
the system's available memory (read after the level loop had the C allocator give back what the process freed:
``allocator.trim_heaps``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import LocalStyle, Settings, StyleTerm
from .errors import FusionError
from .geometry import border_margin, feature_shape, level_shapes, style_shape, with_margin
from .lean_backward import keeps_output
from .matching import DEFAULT_MAX_SCORES
from .precision import mixed_dtype
from .tiles import TilePlan, tile_layers
from .vgg import VGGFeatures

_FLOAT = 4


def _activation_elements(
    vgg: VGGFeatures, shape: tuple[int, int], layers: set[str], after: str | None = None
) -> tuple[int, int, int, int]:
    """For one pass to the deepest of ``layers`` (from the layer after ``after``, on that layer's map of an image
    of ``shape``): elements the backward pass keeps whole, elements it keeps as one-byte signs, elements of the
    returned layers, and the largest activation."""
    first = 0 if after is None else vgg.names.index(after) + 1
    names = vgg.names[: max(vgg.names.index(n) for n in layers) + 1]
    h, w = shape if after is None else feature_shape(shape, after)
    channels = 3 if after is None else vgg.channels(after)
    whole = signs = returned = 0
    largest = channels * h * w
    conv = vgg.convs_before(first)
    for i, name in enumerate(names[first:], start=first):
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


def kept_bytes(
    vgg: VGGFeatures, shape: tuple[int, int], layers: set[str], half: torch.dtype | None, after: str | None = None
) -> int:
    """Bytes the VGG pass to ``layers`` (from after ``after``) keeps for its backward pass at input ``shape``: whole
    activations at the pass's precision (``half``, or float32 for None), one byte per other activation, and under
    mixed precision the float32 copies of the returned layers that the losses use."""
    whole, signs, returned, _ = _activation_elements(vgg, shape, layers, after)
    if half is None:
        return whole * _FLOAT + signs
    return whole * (torch.finfo(half).bits // 8) + signs + returned * _FLOAT


def _layers(styles: Sequence[StyleTerm], settings: Settings) -> set[str]:
    layers = {settings.content_layer}
    for style in styles:
        layers.update(style.feature_layers())
    return layers


def _content_maps(vgg: VGGFeatures, shape: tuple[int, int], styles: Sequence[StyleTerm], settings: Settings) -> int:
    """Elements of the content image's maps a level holds whole: the content term's target and the patch searches'
    guides (``Settings.match_content``), one map per layer."""
    layers = {settings.content_layer} if settings.content_weight > 0 else set()
    if settings.match_content > 0:
        layers |= {style.layer for style in styles if isinstance(style, LocalStyle) and style.weight > 0}
    return _activation_elements(vgg, shape, layers)[2] if layers else 0


def _vectors(settings: Settings, history: int) -> int:
    """Image-sized float32 vectors the optimiser holds, with the image and its gradient."""
    # L-BFGS: history pairs of (y, s), direction, previous gradient; plus image and gradient. Adam: 2 moments.
    return 2 * history + 4 if settings.optimizer == "lbfgs" else 4


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
    # the content's maps and the patch losses' style maps
    setting_up, targets = 0, max(returned // 2, _content_maps(vgg, shape, styles, settings)) * _FLOAT
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
    split: str | None = None,
) -> int:
    """Peak bytes for optimising an output of ``shape`` in tiles of ``tile`` px (tiling.py), the layers after
    ``split`` whole: the image-sized vectors, the targets kept whole (the content's map, each patch loss's style
    map, its search's projection and matches), and the larger of the largest tile's evaluation, as
    ``estimate_bytes`` counts a whole image's, and the deep layers' pass on the whole ``split`` map."""
    layers = _layers(styles, settings)
    half = mixed_dtype(vgg.device, settings.mixed_precision)
    pass_bytes = _FLOAT if half is None else torch.finfo(half).bits // 8
    patches = [(s.layer, s.patch_size, s.stride) for s in styles if isinstance(s, LocalStyle)]
    extra = tile_layers(vgg.names, layers, patches, split)
    crops = [tile.crop for tile in TilePlan(vgg.names, shape, extra, tile).tiles]
    crop = max(((c[0].stop - c[0].start, c[1].stop - c[1].start) for c in crops), key=math.prod)
    head = set(extra)
    local_layers = {settings.content_layer} | {s.layer for s in styles if isinstance(s, LocalStyle)}
    pixels = 3 * shape[0] * shape[1]
    whole = (_vectors(settings, history) * pixels + _content_maps(vgg, shape, styles, settings)) * _FLOAT
    searches, setting_up = 0, 0
    for style in styles:
        size = style_shape(tuple(style.image.shape[-2:]), shape, style.scale)
        style_crop = (min(tile, size[0]), min(tile, size[1]))
        _, _, returned, largest = _activation_elements(vgg, style_crop, layers)
        setting_up = max(setting_up, (2 * largest + returned) * _FLOAT)
        if isinstance(style, LocalStyle):
            channels, (h, w) = vgg.channels(style.layer), feature_shape(size, style.layer)
            queries = math.prod(feature_shape(shape, style.layer))
            # the style map, its projection (64 values per patch) and squared norms, the matches and candidates
            searches += (channels + 64 + 4) * h * w * _FLOAT + queries * (2 + 9) * 8
    one_tile = _pass_bytes(vgg, crop, head, local_layers & head, half, pass_bytes)
    if split is None:
        return whole + searches + max(one_tile, setting_up)
    # the split layer's map of the whole image and its gradient, held from the deep pass through the tiles' passes;
    # during the deep pass, the first pass's recorded tile too
    deep_map = 2 * vgg.channels(split) * math.prod(feature_shape(shape, split)) * pass_bytes
    deep = _pass_bytes(vgg, shape, layers - head, local_layers - head, half, pass_bytes, after=split)
    recorded = kept_bytes(vgg, crop, head, half)
    return whole + searches + max(deep_map + max(one_tile, recorded + deep), setting_up)


def _pass_bytes(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    layers: set[str],
    local_layers: set[str],
    half: torch.dtype | None,
    pass_bytes: int,
    after: str | None = None,
) -> int:
    """One evaluation's pass to ``layers`` (from after ``after``) on an image of ``shape``: what the backward pass
    keeps, a few gradients of the largest activation, the content and patch layers' targets and differences."""
    largest = _activation_elements(vgg, shape, layers, after)[3]
    local = _activation_elements(vgg, shape, local_layers, after)[2] if local_layers else 0
    return (
        kept_bytes(vgg, shape, layers, half, after)
        + 3 * largest * pass_bytes  # gradients in the backward pass
        + 3 * local * _FLOAT  # the targets and differences on the content and patch layers
        + DEFAULT_MAX_SCORES * _FLOAT
    )


@dataclass(frozen=True)
class LevelPlan:
    """How a level is evaluated: whole (``tile`` 0) or in tiles of ``tile`` px with the layers after ``split`` (a
    pooling layer, or None) whole (tiling.py), and the L-BFGS history it keeps."""

    tile: int
    history: int
    split: str | None = None


def plan_bytes(
    vgg: VGGFeatures, shape: tuple[int, int], styles: Sequence[StyleTerm], settings: Settings, plan: LevelPlan
) -> int:
    """Peak bytes for optimising an output of ``shape`` as ``plan`` says: ``estimate_bytes`` whole (tile 0), else
    ``tiled_bytes``."""
    if plan.tile == 0:
        return estimate_bytes(vgg, shape, styles, settings, plan.history)
    return tiled_bytes(vgg, shape, styles, settings, plan.tile, plan.history, plan.split)


MARGIN = 0.9  # the share of the free memory a plan uses: the estimate is an estimate, and others allocate too
MIN_HISTORY = 5  # the automatic choice shrinks the tiles before the L-BFGS history below this
SPLIT_TILE = 768  # the largest automatic tile when the deep layers run whole (larger ones were no faster)


def split_candidates(vgg: VGGFeatures, layers: set[str]) -> list[str]:
    """The pooling layers after which the deep layers may run whole, from the fastest (shallowest) choice on."""
    deepest = max(vgg.names.index(layer) for layer in layers)
    return [name for name in vgg.names[:deepest] if name.startswith("pool")]


def plan_level(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    styles: Sequence[StyleTerm],
    settings: Settings,
    available: int | None = None,
) -> LevelPlan:
    """Whole or tiled, the split and the history, for optimising a canvas of ``shape`` in the memory ``available``
    (default: what the device has free).

    A level is tiled only when it would not fit whole, or when ``settings.tile`` > 0 asks for tiles of that size.
    Tiled, the deep layers run whole after the shallowest split that fits (the fastest choice; ``split_candidates``)
    in tiles of at most SPLIT_TILE px, else every layer runs in tiles, as large as fit; each choice must leave the
    L-BFGS history at least MIN_HISTORY (or ``settings.history_size`` if smaller). Only where none does, the
    history shrinks, down to 1, with the smallest tiles."""
    available = available_bytes(vgg.device, settings.max_memory) if available is None else available
    wanted = settings.history_size if settings.optimizer == "lbfgs" else 0
    budget = None if available is None else MARGIN * available
    splits = [*split_candidates(vgg, _layers(styles, settings)), None]

    def history_for(tile: int, split: str | None = None) -> int:
        """The longest history (<= wanted) that fits with ``tile`` (0: whole) and ``split``, or -1."""
        for history in range(wanted, -1, -1):
            needed = plan_bytes(vgg, shape, styles, settings, LevelPlan(tile, history, split))
            if budget is None or needed <= budget:
                return history
            if settings.optimizer != "lbfgs":
                break
        return -1

    enough, some = min(MIN_HISTORY, wanted), min(1, wanted)
    if settings.tile > 0:
        choices = [(settings.tile, split) for split in splits]
    else:
        if history_for(0) == wanted:
            return LevelPlan(0, wanted)
        sizes, size = [], max(shape) - 64
        while size >= MIN_TILE:  # from tiles of nearly the whole canvas down, ~15% at a time
            sizes.append(size // 64 * 64)
            size = int(size * 0.85)
        capped = [size for size in sizes if size <= SPLIT_TILE] or sizes[-1:]
        choices = [(size, split) for split in splits[:-1] for size in capped] + [(size, None) for size in sizes]
    for tile, split in choices:
        history = history_for(tile, split)
        if history >= enough:
            return LevelPlan(tile, history, split)
    if choices:  # the smallest tiles, every layer in tiles: the least memory, with a shorter history
        tile = choices[-1][0]
        history = history_for(tile)
        if history >= some:
            return LevelPlan(tile, history)
    _refuse(vgg, shape, styles, settings, available, choices[-1][0] if choices else MIN_TILE)
    raise AssertionError  # _refuse raises


def run_bytes(vgg: VGGFeatures, content_shape: tuple[int, int], styles: Sequence[StyleTerm], settings: Settings) -> int:
    """The bytes a run on a content image of ``content_shape`` (height, width) needs on its device: the network's
    weights and its largest level (the last, with its mirrored margin) as planned within ``settings.max_memory``
    (whole without one). What a host that can free memory for a run (ComfyUI unloading other models) asks for."""
    model = sum(t.numel() * t.element_size() for t in vgg.parameters())
    shape = level_shapes(*content_shape, settings.size, settings.levels)[-1]
    canvas = with_margin(shape, border_margin(shape))
    budget = round(settings.max_memory * 2**30) if settings.max_memory > 0 else _UNBOUNDED
    return model + plan_bytes(vgg, canvas, styles, settings, plan_level(vgg, canvas, styles, settings, budget))


_UNBOUNDED = 2**62  # a budget no level exceeds: the plan as settings.tile alone asks


MIN_TILE = 384  # the smallest automatic tile: smaller ones spend most of their time on the halo (tiling.py)


def available_bytes(device: torch.device, max_memory: float = 0.0) -> int | None:
    """The memory a run on ``device`` may use now, or None where it cannot be told: what the device has free, and
    with ``max_memory`` > 0 (GB, ``Settings.max_memory``) no more than that budget less what the process already
    holds there (``held_bytes``)."""
    free = _free_bytes(device)
    if max_memory > 0:
        budget = max(0, int(max_memory * 2**30) - held_bytes(device))
        free = budget if free is None else min(free, budget)
    return free


def _free_bytes(device: torch.device) -> int | None:
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
        # What the process has freed but glibc keeps in its heaps is the run's to use too, and not counted here: the
        # level loop gives it back first (allocator.trim_heaps).
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def held_bytes(device: torch.device) -> int:
    """What the process holds on ``device`` now, which a memory budget must leave room for: on a CPU its resident
    memory (torch itself, about half a gigabyte, the network, the images, and in a host program everything the host
    holds); on a GPU the memory torch's tensors take there. 0 where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def _refuse(
    vgg: VGGFeatures,
    shape: tuple[int, int],
    styles: Sequence[StyleTerm],
    settings: Settings,
    available: int,
    tile: int,
) -> None:
    needed = tiled_bytes(vgg, shape, styles, settings, tile, 1 if settings.optimizer == "lbfgs" else 0)
    fits = max(64, int(settings.size * math.sqrt(MARGIN * available / needed)) // 64 * 64)
    advice = f"use a smaller size (about {fits} px would fit)"
    if settings.optimizer == "lbfgs":
        advice += " or optimizer 'adam'"
    if settings.max_memory > 0:
        advice += f" or a larger max_memory (now {settings.max_memory:g} GB)"
        where = (
            f"max_memory {settings.max_memory:g} GB leaves {available / 2**30:.2f} GiB beside what the process holds "
            f"on {vgg.device} ({held_bytes(vgg.device) / 2**30:.2f} GiB) and what the device has free"
        )
    else:
        where = f"only {available / 2**30:.2f} GiB is free on {vgg.device}"
    raise FusionError(
        f"size: an output of {shape[1]}x{shape[0]} px needs about {needed / 2**30:.2f} GiB even in tiles of {tile} px, "
        f"but {where}, and plans keep {1 - MARGIN:.0%} of it spare ({MARGIN * available / 2**30:.2f} GiB usable); "
        f"{advice}"
    )
