"""Estimate the memory a run needs before starting it, and refuse runs that cannot fit.

The estimate counts what the largest pyramid level holds at once: the activations autograd keeps
for the VGG pass (one tensor per conv, ReLUs being in place, plus max-pool indices), the gradient
buffers of the backward pass, the style activations kept as targets, the nearest-patch search's
score block, and the optimiser state. It is deliberately a little generous.
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


def _activation_elements(vgg: VGGFeatures, shape: tuple[int, int], deepest: str) -> tuple[int, int]:
    """(elements autograd keeps, largest single activation) for one pass up to ``deepest``."""
    h, w = shape
    kept = largest = 3 * h * w
    conv = 0
    for name in vgg.names[: vgg.names.index(deepest) + 1]:
        if name.startswith("conv"):
            channels = vgg.convs[conv].out_channels
            conv += 1
            kept += channels * h * w
            largest = max(largest, channels * h * w)
        elif name.startswith("pool"):
            h, w = h // 2, w // 2
            kept += channels * h * w * (3 if vgg.pooling == "max" else 1)  # output + int64 indices
    return kept, largest


def estimate_bytes(vgg: VGGFeatures, shape: tuple[int, int], styles: Sequence[StyleTerm], settings: Settings) -> int:
    """Peak bytes for optimising an output of ``shape`` (the last, largest level)."""
    layers = {settings.content_layer}
    for style in styles:
        layers.update(style.layers if isinstance(style, GlobalStyle) else (style.layer,))
    deepest = max(layers, key=vgg.names.index)
    kept, largest = _activation_elements(vgg, shape, deepest)
    total = kept + 3 * largest  # the backward pass holds a few gradients of the largest size at once
    for style in styles:
        style_shape = fit_longest(style.image.shape[-2], style.image.shape[-1], round(max(shape) * style.scale))
        style_kept, style_largest = _activation_elements(vgg, style_shape, deepest)
        total += style_largest + style_kept // 4  # the pass itself, and the targets kept from it
    pixels = 3 * shape[0] * shape[1]
    history = 2 * settings.history_size + 4 if settings.optimizer == "lbfgs" else 4
    total += history * pixels + DEFAULT_MAX_SCORES
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
