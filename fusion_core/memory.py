"""Estimate the memory a run needs before starting it, and refuse runs that cannot fit.

The estimate counts what the largest pyramid level holds at once: what the VGG pass keeps for its
backward pass (the activations the losses use, whole; one byte per other activation, see
``vgg._FrozenConvReLU``), a few gradients of the largest activation in the backward pass, the style
activations kept as targets, the nearest-patch search's score block, and the optimiser state. It is
deliberately a little generous (at 1024 px it is ~1.2x the tensor memory measured in BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import GlobalStyle, Settings, StyleTerm
from .errors import FusionError
from .matching import DEFAULT_MAX_SCORES
from .pyramid import fit_longest
from .vgg import VGGFeatures

_FLOAT = 4


def _activation_elements(vgg: VGGFeatures, shape: tuple[int, int], layers: set[str]) -> tuple[int, int, int]:
    """(float32 elements the backward pass keeps, elements of the returned layers, largest activation)
    for one pass to the deepest of ``layers``."""
    names = vgg.names[: max(vgg.names.index(n) for n in layers) + 1]
    h, w = shape
    kept = returned = 0
    largest = 3 * h * w
    conv = 0
    for i, name in enumerate(names):
        if name.startswith("conv"):
            channels = vgg.convs[conv].out_channels
            conv += 1
            size = channels * h * w
            largest = max(largest, size)
            whole = name in layers or vgg.keeps_relu_whole(names, i, layers)  # a returned conv output: unfused
            kept += size if whole else size // 4  # a ReLU's sign: one byte
        elif name.startswith("pool"):
            h, w = h // 2, w // 2
        if name in layers:
            returned += channels * h * w
    return kept, returned, largest


def estimate_bytes(vgg: VGGFeatures, shape: tuple[int, int], styles: Sequence[StyleTerm], settings: Settings) -> int:
    """Peak bytes for optimising an output of ``shape`` (the last, largest level)."""
    layers = {settings.content_layer}
    for style in styles:
        layers.update(style.layers if isinstance(style, GlobalStyle) else (style.layer,))
    kept, returned, largest = _activation_elements(vgg, shape, layers)
    pixels = 3 * shape[0] * shape[1]
    # L-BFGS: history_size + 1 pairs of (y, s), direction, previous gradient, q; plus image and gradient
    history = 2 * (settings.history_size + 1) + 5 if settings.optimizer == "lbfgs" else 4
    # Optimising: the pass's kept activations, a few gradients of the largest size in the backward pass.
    optimising = kept + 3 * largest + history * pixels + DEFAULT_MAX_SCORES
    # Before that, each style image's pass (the two largest activations at once) and the layers cached from it.
    setting_up, targets = 0, returned // 2  # the content target and the patch loss's maps
    for style in {id(style.image): style for style in styles}.values():
        style_shape = fit_longest(style.image.shape[-2], style.image.shape[-1], round(max(shape) * style.scale))
        _, style_returned, style_largest = _activation_elements(vgg, style_shape, layers)
        setting_up = max(setting_up, 2 * style_largest + style_returned)
    total = max(optimising, setting_up) + targets
    return total * _FLOAT


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``, or None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
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
