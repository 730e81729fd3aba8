"""Mixed precision: a 16-bit VGG pass and patch search, float32 for everything else.

Where the hardware computes 16-bit floats natively, the network's convolutions and the fast search's
candidate scores run under ``torch.autocast``: float16 on CUDA, bfloat16 on a CPU with bfloat16
instructions (AVX512-BF16 or AMX), where oneDNN's bfloat16 convolutions run 2-2.7x faster than
float32 ones (BENCHMARKS.md). The activations are cast back to float32 before any loss sees them, so
Gram matrices, loss values, the image and the L-BFGS state stay float32. Elsewhere (a CPU without
those instructions emulates bfloat16, more slowly than float32; MPS and other devices) everything
stays float32.

The loss gradients reaching the activations are tiny (1e-8..1e-4 per element with the default
weights, smaller at larger sizes) and would mostly underflow in float16. They are multiplied by
``GRAD_SCALE`` on entering the 16-bit backward pass and divided by it again at the image: a fixed
loss scale (a power of two, so exact), so the optimiser never sees it and no step has to be retried.
bfloat16 has float32's range and would not need it; one code path serves both.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

GRAD_SCALE = 2.0**16


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (x86 AVX512-BF16 or AMX) and torch has oneDNN,
    the library whose convolutions use them."""
    if not torch.backends.mkldnn.is_available():
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def mixed_dtype(device: torch.device | str, wanted: bool = True) -> torch.dtype | None:
    """The 16-bit type of the VGG pass on ``device``, or None where mixed precision does not apply."""
    device = torch.device(device)
    if not wanted:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and native_bfloat16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; with None a context that changes nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device, enabled: bool):
    """Inside an ``autocast`` region: a region it does not reach (float32 again)."""
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


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
    """The image as it enters the 16-bit pass: its gradient is unscaled on the way out."""
    return _ScaleGradient.apply(image, 1.0 / GRAD_SCALE) if enabled and image.requires_grad else image


def out_of_half(features: dict[str, Tensor], enabled: bool) -> dict[str, Tensor]:
    """Activations as the losses see them: float32, their gradients scaled up before they turn 16-bit."""
    if not enabled:
        return features
    return {name: _ScaleGradient.apply(value.float(), GRAD_SCALE) for name, value in features.items()}
