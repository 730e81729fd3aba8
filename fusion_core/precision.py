"""Mixed precision on CUDA: float16 for the VGG pass and the patch search, float32 for everything else.

Only the network's convolutions and the fast search's candidate scores run in float16 (under
``torch.autocast``). The activations are cast back to float32 before any loss sees them, so Gram
matrices, loss values, the image and the L-BFGS state stay float32. On a CPU nothing changes:
autocast there means bfloat16, which is slower than float32 on CPUs without native support and
too coarse for the Gram matrices.

The loss gradients reaching the activations are tiny (1e-8..1e-4 per element with the default
weights, smaller at larger sizes) and would mostly underflow in float16. They are multiplied by
``GRAD_SCALE`` on entering the float16 backward pass and divided by it again at the image: a fixed
loss scale, so the optimiser never sees it and no step has to be retried.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

GRAD_SCALE = 2.0**16


def enabled_for(device: torch.device, wanted: bool = True) -> bool:
    """Whether mixed precision applies on ``device``: only CUDA."""
    return wanted and torch.device(device).type == "cuda"


def autocast(enabled: bool):
    """float16 autocast on CUDA when ``enabled``; otherwise a context that changes nothing."""
    return torch.autocast("cuda", dtype=torch.float16) if enabled else contextlib.nullcontext()


def full_precision(enabled: bool):
    """Inside an ``autocast(enabled)`` region: a region it does not reach (float32 again)."""
    return torch.autocast("cuda", enabled=False) if enabled else contextlib.nullcontext()


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def into_half(image: Tensor, enabled: bool) -> Tensor:
    """The image as it enters the float16 pass: its gradient is unscaled on the way out."""
    return _ScaleGradient.apply(image, 1.0 / GRAD_SCALE) if enabled and image.requires_grad else image


def out_of_half(features: dict[str, Tensor], enabled: bool) -> dict[str, Tensor]:
    """Activations as the losses see them: float32, their gradients scaled up before they turn float16."""
    if not enabled:
        return features
    return {name: _ScaleGradient.apply(value.float(), GRAD_SCALE) for name, value in features.items()}
