"""The frozen network's backward pass, keeping a fraction of what autograd would.

Only the image is optimised, so the network's weights need no gradient, and a conv layer's backward pass needs
only its weight and where the ReLU after it was positive, not its float input: ``conv_relu`` keeps one byte per
activation instead of four (at 1024 px ~0.3 GB instead of ~1 GB), and ``max_pool`` keeps one byte per output
(which of its four inputs was the largest) instead of its input or an int64 index per output. The arithmetic is
autograd's. ``VGGFeatures.lean_backward`` is the switch; tests compare both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import memory_format_of
from .precision import banded_backward

BACKWARD_BAND = 1 << 24  # activation values per band of a conv's backward pass (64 MB in float32)


def conv_relu(x: Tensor, weight: Tensor, bias: Tensor, keep_output: bool) -> Tensor:
    """ReLU(conv3x3(x)) with frozen ``weight`` and ``bias``. ``keep_output``: save the output itself for the
    backward pass rather than its sign, for an output that stays alive anyway (returned, or a max pool's input)."""
    return _FrozenConvReLU.apply(x, weight, bias, keep_output)


def max_pool(x: Tensor) -> Tensor:
    """2x2 max pooling that finds the maxima again in the backward pass."""
    return _MaxPool.apply(x)


def max_of_four(x: Tensor) -> Tensor:
    """2x2 max pooling (stride 2, the last odd row or column dropped), the values only: ``F.max_pool2d`` also
    writes an int64 index per output (twice the output's bytes in float32) and on a CPU took 3-4x as long."""
    rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
    out = torch.maximum(x[..., 0 : 2 * rows : 2, 0 : 2 * cols : 2], x[..., 0 : 2 * rows : 2, 1 : 2 * cols : 2])
    torch.maximum(out, x[..., 1 : 2 * rows : 2, 0 : 2 * cols : 2], out=out)
    return torch.maximum(out, x[..., 1 : 2 * rows : 2, 1 : 2 * cols : 2], out=out)


def keeps_output(names: list[str], i: int, wanted: set[str]) -> bool:
    """Whether the ReLU output after conv ``names[i]`` is kept whole rather than as one byte per value: an output
    that stays alive anyway (returned) is kept by its conv rather than as a second, boolean copy. (``memory.py``
    counts with the same rule.)"""
    return "relu" + names[i][4:] in wanted


class _FrozenConvReLU(torch.autograd.Function):
    """On the CPU the backward pass runs in bands of rows (``precision.banded_backward``): a convolution
    library's working copies of a whole full-resolution gradient (64 channels at 1024 px: ~0.5 GB) would set
    the run's peak memory."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, keep_output: bool) -> Tensor:
        y = F.relu(F.conv2d(x, weight, bias, padding=1), inplace=True)
        ctx.save_for_backward(y if keep_output else y > 0, weight)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        sign, weight = ctx.saved_tensors
        weight = weight.to(grad.dtype)  # under autocast the pass ran in float16 / bfloat16
        height = grad.shape[-2]
        rows = max(1, BACKWARD_BAND // max(1, grad[0, :, 0].numel()))
        if rows >= height or not banded_backward(grad.device):
            # The input's gradient of a stride-1 convolution is the transposed convolution of the output's.
            return F.conv_transpose2d(_through_relu(grad, sign), weight, padding=1), None, None, None
        grad_input = torch.empty(
            ctx.input_shape, dtype=ctx.input_dtype, device=grad.device, memory_format=memory_format_of(grad)
        )
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            first, last = max(top - 1, 0), min(bottom + 1, height)  # the gradient rows reaching rows top..bottom-1
            band = _through_relu(grad[..., first:last, :], sign[..., first:last, :])
            spread = F.conv_transpose2d(band, weight, padding=(0, 1))  # input rows first - 1 .. last
            grad_input[..., top:bottom, :] = spread[..., top - first + 1 : bottom - first + 1, :]
        return grad_input, None, None, None


def _through_relu(grad: Tensor, sign: Tensor) -> Tensor:
    """The gradient through a ReLU, from its output's sign (bool) or its output itself."""
    if sign.dtype == torch.bool:
        # where, not grad * sign: a product with a bool tensor casts it to a float temporary first
        return torch.where(sign, grad, 0)
    return torch.ops.aten.threshold_backward(grad, sign, 0)  # what autograd runs for a ReLU


class _MaxPool(torch.autograd.Function):
    """2x2 max pooling keeping, per output, which of its window's four inputs was the largest (one byte), not the
    input: the conv output before a pool then needs only its sign kept, like any other."""

    OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))  # a window's inputs in the order max pooling scans them

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = max_of_four(x)
        rows, cols = out.shape[-2:]
        which = torch.zeros_like(out, dtype=torch.uint8)  # in the output's layout, as the comparisons below are
        # Of equal inputs the first one scanned is the maximum (as max_pool2d's own index says): written last.
        for k in (3, 2, 1, 0):
            dy, dx = _MaxPool.OFFSETS[k]
            which.masked_fill_(x[..., dy : 2 * rows : 2, dx : 2 * cols : 2] == out, k)
        ctx.save_for_backward(which)
        ctx.input_shape, ctx.layout = x.shape, memory_format_of(x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (which,) = ctx.saved_tensors
        grad_input = torch.empty(ctx.input_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        grad_input.zero_()
        rows, cols = grad.shape[-2:]
        for k, (dy, dx) in enumerate(_MaxPool.OFFSETS):
            grad_input[..., dy : 2 * rows : 2, dx : 2 * cols : 2] = torch.where(which == k, grad, 0)
        return grad_input
