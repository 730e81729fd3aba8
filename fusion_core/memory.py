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

import torch

from .config import Settings, StyleTerm
from .errors import FusionError
from .geometry import style_shape
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
            if name in layers or keeps_output(names, i, layers, vgg.pooling):  # a returned conv output: unfused
                whole += size
            else:
                signs += size
        elif name.startswith("pool"):
            h, w = h // 2, w // 2
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


def estimate_bytes(vgg: VGGFeatures, shape: tuple[int, int], styles: Sequence[StyleTerm], settings: Settings) -> int:
    """Peak bytes for optimising an output of ``shape`` (the last, largest level)."""
    layers = {settings.content_layer}
    for style in styles:
        layers.update(style.feature_layers())
    half = mixed_dtype(vgg.device, settings.mixed_precision)
    pass_bytes = _FLOAT if half is None else torch.finfo(half).bits // 8
    _, _, returned, largest = _activation_elements(vgg, shape, layers)
    pixels = 3 * shape[0] * shape[1]
    # L-BFGS: history_size + 1 pairs of (y, s), direction, previous gradient, q; plus image and gradient
    history = 2 * (settings.history_size + 1) + 5 if settings.optimizer == "lbfgs" else 4
    # Optimising: the pass's kept activations, a few gradients of the largest size in the backward pass, the
    # optimiser, a score block.
    optimising = (
        kept_bytes(vgg, shape, layers, half)
        + 3 * largest * pass_bytes
        + (history * pixels + DEFAULT_MAX_SCORES) * _FLOAT
    )
    # Before that, each style image's pass in float32 (the two largest activations at once) and the layers cached
    # from it.
    setting_up, targets = 0, returned // 2 * _FLOAT  # the content target and the patch loss's maps
    for style in {id(style.image): style for style in styles}.values():
        size = style_shape(tuple(style.image.shape[-2:]), shape, style.scale)
        _, _, style_returned, style_largest = _activation_elements(vgg, size, layers)
        setting_up = max(setting_up, (2 * style_largest + style_returned) * _FLOAT)
    return max(optimising, setting_up) + targets


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
) -> None:
    """Raise a FusionError with the estimate and a size that would fit, rather than run out of memory."""
    available = available_bytes(vgg.device) if available is None else available
    if available is None:
        return
    needed = estimate_bytes(vgg, shape, styles, settings)
    if needed <= 0.9 * available:
        return
    fits = max(64, int(settings.size * math.sqrt(0.9 * available / needed)) // 64 * 64)
    advice = f"use a smaller size (about {fits} px would fit)"
    if settings.optimizer == "lbfgs":
        advice += ", a smaller history_size, or optimizer 'adam'"
    raise FusionError(
        f"size: an output of {shape[1]}x{shape[0]} px needs about {needed / 2**30:.1f} GiB, but only "
        f"{available / 2**30:.1f} GiB is free on {vgg.device}; {advice}"
    )
