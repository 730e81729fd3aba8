"""Every choice that depends on the device, in one place: number types, precision switches, memory layout.

Mixed precision. Where the hardware computes 16-bit floats natively, the network's convolutions and the fast
search's candidate scores run under ``torch.autocast``: float16 on CUDA, bfloat16 on a CPU with bfloat16
instructions (AVX512-BF16 or AMX), where oneDNN's bfloat16 convolutions run 2-2.7x faster than float32 ones
(BENCHMARKS.md). The activations are cast back to float32 before any loss sees them, so Gram matrices, loss
values, the image and the optimiser state stay float32. Elsewhere (a CPU without those instructions emulates
bfloat16, more slowly than float32; MPS, whose autocast torch added late) everything stays float32.

The loss gradients reaching the activations are tiny and shrink as the image grows (the losses are means over
positions), so in float16 most would underflow. ``GradientScale`` multiplies them on entering the 16-bit
backward pass and divides them again at the image; the factor follows the gradients' size (see its docstring),
and the caller checks that the image gradient is finite before every optimiser step.

What stays float32 is float32 on CUDA too: ``full_float32`` keeps TF32 (which cuDNN uses for float32
convolutions by default, and hosts often allow for matrix products) out of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor


def best_device() -> torch.device:
    """The fastest device present: a CUDA GPU, else an Apple GPU (MPS), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def _has_autocast(device_type: str) -> bool:
    """Whether ``torch.autocast`` accepts ``device_type`` on this torch (torch < 2.5 raises for "mps")."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available is not None:
        return bool(available(device_type))
    return device_type in ("cpu", "cuda")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; with None a context that changes nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def float32_region(device: torch.device):
    """A region that an enclosing ``autocast`` does not reach, on any device and any torch: where autocast does
    not exist for the device, nothing can have switched it on, and nothing needs switching off."""
    if not _has_autocast(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(object, attribute, float32 value) of the switches that let CUDA round float32 work to TF32: matrix
    products, then convolutions.

    torch >= 2.9 has ``fp32_precision`` settings beside the older ``allow_tf32`` flags, and raises when code reads
    an old flag after the new setting was used ("mix of the legacy and new APIs"); the new settings can be read
    whichever way the host set them, so they are used wherever they exist."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def full_float32(convolutions: bool) -> Iterator[None]:
    """A region where float32 matrix products on CUDA, and with ``convolutions`` float32 convolutions too, are
    computed in float32, whatever the host application set.

    Host applications often switch TF32 (10 mantissa bits, float16's precision) on for matrix products, and
    cuDNN runs float32 convolutions in TF32 by default. Our Gram matrices, losses and exact scores are float32
    on every path, so matrix products are always held to float32. Convolutions are where the float32 path
    (mixed precision off, or a device without it) asks for them: in TF32 that path would be no more precise
    than the 16-bit one. With mixed precision on, the network runs in float16 and the float32 convolutions
    left (the fast search's projection, the patch norms) work on float16 activations, so TF32 loses nothing
    there and is left to the host. The switches are global: set on entering the outermost region and set back to
    what they were on leaving it (a region inside another that asks for no more, as a run's criterion inside
    ``stylize``'s, changes nothing); they concern CUDA only."""
    if not _cuda_present() or (_held and (_held[-1] or not convolutions)):
        yield
        return
    switches = _tf32_switches()[: 2 if convolutions else 1]
    saved = [getattr(owner, name) for owner, name, _ in switches]
    _held.append(convolutions)
    try:
        for owner, name, value in switches:
            setattr(owner, name, value)
        yield
    finally:
        _held.pop()
        for (owner, name, _), value in zip(switches, saved, strict=True):
            setattr(owner, name, value)


# The regions entered (full_float32): the switches are set once, by the outermost region, and set back when it ends.
_held: list[bool] = []


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The type for sums whose small differences matter (the patch loss's constant residual): float64 on the
    CPU, where it is cheap; float32 on GPUs, which have no float64 (MPS) or run it at 1/32 speed."""
    return torch.float64 if device.type == "cpu" else torch.float32


def banded_backward(device: torch.device) -> bool:
    """Whether convolutions' backward passes run in bands of rows (vgg.py): on the CPU a convolution library's
    working copies of a whole full-resolution gradient would set the peak memory; on GPUs the caching allocator
    reuses such blocks, and bands only cost kernel launches."""
    return device.type == "cpu"


def memory_format(device: torch.device) -> torch.memory_format:
    """The activation layout whose convolutions run fastest: channels-last on CPUs (1.6x forward, 2x backward
    for a 64-channel 3x3 convolution at 512 px on our test CPU, 10x for max pooling) and on CUDA (tensor
    cores); the default layout elsewhere."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


def gather_budget(device: torch.device) -> int:
    """float32 values per chunk of gathered style patches in the fast search's exact re-ranking
    (``matching._patch_dots``). The block is written and read back at once, so on a CPU one that stays in the
    caches is fastest: 2^20 (4 MB); on our 2-core test CPU 2^19 or 2^21 took 10-25% longer and 2^18 (Python
    overhead of small chunks) or 2^22 twice as long. GPUs have no such caches and pay for every kernel launch
    instead: 2^24 (64 MB, the size of one score block) keeps the launches few."""
    return 1 << 20 if device.type == "cpu" else 1 << 24


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` on the way back and, with ``watch``, records the
    largest incoming gradient magnitude there (on the device: no host transfer)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float, watch: GradientScale | None) -> Tensor:
        ctx.factor, ctx.watch = factor, watch
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.watch is not None:
            ctx.watch.observe(grad)
        return grad * ctx.factor, None, None


class GradientScale:
    """The factor that keeps the 16-bit backward pass's gradients in float16's range.

    Gradients are multiplied by ``scale`` where the float32 losses hand them to the 16-bit pass and divided by it
    at the image (powers of two: exact). After every evaluation the caller reads ``largest`` (the largest
    unscaled gradient magnitude that entered the pass) together with its other per-iteration values and calls
    ``update``: the next scale puts that magnitude at ``TARGET``, 2^10, which leaves float16's largest value
    (6.5e4) 64x of headroom for the growth of gradients through the backward pass and places float16's smallest
    normal number (6.1e-5) 2^24 below the largest gradient. A fixed scale cannot: the gradients shrink with the
    image's area. A non-finite image gradient means the headroom was not enough: ``update`` divides the scale
    by 2^8 and asks for the evaluation to be repeated. bfloat16 has float32's range and needs none of this: there
    the scale is off (``enabled`` False), and ``for_losses`` only casts.
    """

    TARGET = 2.0**10
    START = 2.0**16
    FLOOR = 1.0  # a scale below 1 would not help: the overflow is not the scale's doing

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.scale = self.START
        self.largest: Tensor | None = None  # this evaluation's largest unscaled gradient entering the pass

    def unscale_at(self, image: Tensor) -> Tensor:
        """``image``, marked so that the gradient reaching it is divided by the scale again (where the 16-bit pass
        begins); it also starts a new evaluation's measure."""
        self.largest = None
        if not (self.enabled and image.requires_grad):
            return image
        return _ScaleGradient.apply(image, 1.0 / self.scale, None)

    def for_losses(self, activation: Tensor) -> Tensor:
        """An activation as the losses see it: float32 and, with the scale on, their gradient multiplied by the scale
        (and measured) before it enters the 16-bit backward pass."""
        if not self.enabled:
            return activation.float()
        return _ScaleGradient.apply(activation.float(), self.scale, self)

    def observe(self, grad: Tensor) -> None:
        largest = grad.detach().abs().amax().float()
        self.largest = largest if self.largest is None else torch.maximum(self.largest, largest)

    def update(self, largest: float, finite: bool) -> bool:
        """Set the next scale from this evaluation's ``largest`` gradient and whether the image gradient was
        ``finite``; returns True when the evaluation must be repeated with the new scale."""
        if not self.enabled:
            return False
        if not finite:
            if self.scale <= self.FLOOR:
                return False  # the caller reports the non-finite gradient
            self.scale = max(self.FLOOR, self.scale / 2.0**8)
            return True
        if largest > 0 and math.isfinite(largest):
            self.scale = max(self.FLOOR, 2.0 ** math.floor(math.log2(self.TARGET / largest)))
        return False
