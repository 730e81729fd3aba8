"""The frozen network's backward pass, keeping a fraction of what autograd would.

Only the image is optimised, so the network's weights need no gradient, and a conv layer's backward pass needs
only its weight and where the ReLU after it was positive, not its float input: ``conv_relu`` keeps one byte per
activation instead of four (at 1024 px ~0.3 GB instead of ~1 GB), and ``max_pool`` keeps its input (alive
anyway) instead of an int64 index per output. The arithmetic is autograd's. ``VGGFeatures.lean_backward`` is the
switch; tests compare both ways.
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


def keeps_output(names: list[str], i: int, wanted: set[str], pooling: str) -> bool:
    """Whether the ReLU output after conv ``names[i]`` is kept whole rather than as one byte per value: an output
    that stays alive anyway (returned, or saved by the max pool after it) is kept by its conv rather than as a
    second, boolean copy. (``memory.py`` counts with the same rule.)"""
    pooled = i + 2 < len(names) and names[i + 2].startswith("pool") and pooling == "max"
    return "relu" + names[i][4:] in wanted or pooled


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
        return grad * sign
    return torch.ops.aten.threshold_backward(grad, sign, 0)  # what autograd runs for a ReLU


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        _, index = F.max_pool2d(x, 2, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index)
