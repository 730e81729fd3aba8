"""VGG16/VGG19 feature extractor with named layers (``relu3_1``), built from a state dict.

The network is rebuilt from the weights alone: the architecture is told by the number of conv layers
(13 = VGG16, 16 = VGG19) and the channel widths are read from the weight shapes, so tests can use a
narrow VGG with random weights. Only layers up to the deepest one asked for are ever run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import FusionError
from .functional import memory_format_of

# Convs per block, and the index of each conv in torchvision's ``features`` Sequential.
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
CONVENTIONS = ("torchvision", "caffe")
POOLINGS = ("max", "avg")

_TORCHVISION_MEAN = (0.485, 0.456, 0.406)
_TORCHVISION_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
BACKWARD_BAND = 1 << 24  # activation values per band of a conv's backward pass (64 MB in float32)
# Devices whose convolution libraries are fastest on channels-last (positions-last) maps: on this CPU a
# 64-channel 3x3 convolution at 512 px runs 1.6x faster forward and 2x faster backward, and max pooling 10x.
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


def torchvision_conv_indices(arch: str) -> list[int]:
    """Indices of the conv layers in torchvision's ``vgg*.features`` (conv, relu, ..., pool)."""
    indices, i = [], 0
    for n_convs in BLOCKS[arch]:
        for _ in range(n_convs):
            indices.append(i)
            i += 2  # conv, relu
        i += 1  # pool
    return indices


def layer_names(arch: str) -> list[str]:
    """All tappable layers in order: conv1_1, relu1_1, ..., pool1, ..."""
    names = []
    for block, n_convs in enumerate(BLOCKS[arch], start=1):
        for i in range(1, n_convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


def layer_stride(name: str) -> int:
    """Downsampling factor of a layer's output relative to the input image."""
    block = int(name[4:].split("_")[0])
    return 2**block if name.startswith("pool") else 2 ** (block - 1)


class VGGFeatures(nn.Module):
    """Frozen VGG trunk; ``forward(image, layers)`` returns ``{name: activation}``.

    ``image`` is RGB in 0..1 with shape (B, 3, H, W); the input convention of the weights
    (torchvision or Caffe) is applied inside, so callers never think about it. On CPU and CUDA the
    activations are channels-last (``CHANNELS_LAST_DEVICES``), the layout their convolutions run fastest in.
    """

    def __init__(
        self,
        convs: list[tuple[Tensor, Tensor]],
        *,
        convention: str = "torchvision",
        pooling: str = "max",
    ) -> None:
        super().__init__()
        arch = {13: "vgg16", 16: "vgg19"}.get(len(convs))
        if arch is None:
            raise FusionError(f"weights: expected 13 (VGG16) or 16 (VGG19) conv layers, got {len(convs)}")
        if convention not in CONVENTIONS:
            raise FusionError(f"convention: {convention!r} is not one of {', '.join(CONVENTIONS)}")
        if pooling not in POOLINGS:
            raise FusionError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.arch, self.convention, self.pooling = arch, convention, pooling
        self.names = layer_names(arch)
        self.convs = nn.ModuleList()
        for weight, bias in convs:
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(bias)
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()
        if convention == "caffe":
            mean = torch.tensor(_CAFFE_MEAN_BGR).view(1, 3, 1, 1)
            self.register_buffer("_mean", mean, persistent=False)
            self.register_buffer("_std", torch.ones_like(mean), persistent=False)
        else:
            self.register_buffer("_mean", torch.tensor(_TORCHVISION_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("_std", torch.tensor(_TORCHVISION_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.convs[0].weight.device

    def check_layers(self, layers: Iterable[str]) -> None:
        unknown = [name for name in layers if name not in self.names]
        if unknown:
            valid = ", ".join(n for n in self.names if not n.startswith("conv"))
            raise FusionError(
                f"layers: unknown layer(s) {', '.join(map(repr, unknown))} for {self.arch}; valid: {valid}"
            )

    def normalize(self, image: Tensor) -> Tensor:
        if self.convention == "caffe":
            image = image.flip(1) * 255.0  # RGB 0..1 -> BGR 0..255
        layout = torch.channels_last if image.device.type in CHANNELS_LAST_DEVICES else torch.contiguous_format
        return ((image - self._mean) / self._std).contiguous(memory_format=layout)

    def keeps_relu_whole(self, names: list[str], i: int, wanted: set[str]) -> bool:
        """Whether the backward pass keeps the ReLU output after conv ``names[i]`` whole rather than as one byte
        per value: an output that stays alive anyway (returned, or saved by the max pool after it) is kept
        by its conv rather than as a second, boolean copy. (``memory.py`` counts with the same rule.)"""
        pooled = i + 2 < len(names) and names[i + 2].startswith("pool") and self.pooling == "max"
        return "relu" + names[i][4:] in wanted or pooled

    def forward(
        self, image: Tensor, layers: Iterable[str], on_layer: Callable[[str, Tensor], None] | None = None
    ) -> dict[str, Tensor]:
        """Activations of ``layers``; ``on_layer(name, activation)`` is called as each one is computed."""
        wanted = set(layers)
        self.check_layers(wanted)
        names = self.names[: max(self.names.index(n) for n in wanted) + 1]
        x = self.normalize(image)
        # While autograd records the pass, let the frozen layers keep only what their backward needs.
        compact = torch.is_grad_enabled() and x.requires_grad and not any(p.requires_grad for p in self.parameters())
        out: dict[str, Tensor] = {}
        conv_i = 0
        fused = False  # the ReLU was applied with its conv
        for i, name in enumerate(names):
            if name.startswith("conv"):
                conv = self.convs[conv_i]
                conv_i += 1
                fused = compact and name not in wanted
                if fused:
                    x = _FrozenConvReLU.apply(x, conv.weight, conv.bias, self.keeps_relu_whole(names, i, wanted))
                else:
                    x = conv(x)
            elif name.startswith("relu"):
                if not fused:
                    # In place only when the conv output it overwrites is not one we return.
                    x = F.relu(x, inplace="conv" + name[4:] not in wanted)
            elif self.pooling == "max":
                x = _MaxPool.apply(x) if compact else F.max_pool2d(x, 2)
            else:
                x = F.avg_pool2d(x, 2)
            if name in wanted:
                out[name] = x
                if on_layer is not None:
                    on_layer(name, x)
        return out


class _FrozenConvReLU(torch.autograd.Function):
    """ReLU(conv(x)) with frozen weights, keeping for the backward pass one byte per activation.

    Autograd keeps every conv's float input (the ReLU output before it) to compute the weight's gradient;
    with the weights frozen, the input's gradient needs only the weight and where the ReLU's output was
    positive. At 1024 px that is ~0.3 GB kept instead of ~1 GB; the arithmetic is the same.
    ``keep_output``: save the output itself as that sign, for an output that stays alive anyway.

    The backward pass runs in bands of rows: a convolution library's working copies of a whole
    full-resolution gradient (64 channels at 1024 px: ~0.5 GB on a CPU) would set the run's peak memory.
    """

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
        if rows >= height:
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
    """2x2 max pooling that saves its input (kept alive anyway, see ``_FrozenConvReLU``) rather than an
    int64 index per output (twice the output's size), and finds the maxima again in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        _, index = F.max_pool2d(x, 2, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index)


def vgg_from_state_dict(
    state: Mapping[str, Tensor],
    *,
    convention: str = "torchvision",
    pooling: str = "max",
) -> VGGFeatures:
    """Build the trunk from a torchvision-style state dict (full or features-only)."""
    features: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        name = key.removeprefix("module.").removeprefix("features.")
        if "running_mean" in name or "num_batches_tracked" in name:
            raise FusionError("weights: batch-norm VGG (vgg*_bn) is not supported; use plain VGG16/VGG19 weights")
        index, _, param = name.partition(".")
        if not index.isdigit() or param not in ("weight", "bias"):
            raise FusionError(
                f"weights: unexpected key {key!r}; expected torchvision VGG16/VGG19 keys 'features.N.weight/bias'"
            )
        features[name] = value
    indices = sorted({int(k.split(".")[0]) for k in features})
    arch = {13: "vgg16", 16: "vgg19"}.get(len(indices))
    if arch is None or indices != torchvision_conv_indices(arch):
        raise FusionError(
            f"weights: found {len(indices)} conv layers at features indices {indices[:20]}; "
            "expected torchvision VGG16 (13 convs) or VGG19 (16 convs)"
        )
    convs = []
    in_channels = 3
    for i in indices:
        weight, bias = features.get(f"{i}.weight"), features.get(f"{i}.bias")
        if weight is None or bias is None:
            raise FusionError(f"weights: conv features.{i} lacks its weight or bias")
        if weight.ndim != 4 or weight.shape[1:] != (in_channels, 3, 3) or bias.shape != weight.shape[:1]:
            raise FusionError(
                f"weights: features.{i}.weight has shape {tuple(weight.shape)}, expected (out, {in_channels}, 3, 3)"
            )
        convs.append((weight.float(), bias.float()))
        in_channels = weight.shape[0]
    return VGGFeatures(convs, convention=convention, pooling=pooling)


def random_vgg(
    arch: str = "vgg19",
    *,
    width: int = 64,
    seed: int = 0,
    convention: str = "torchvision",
    pooling: str = "max",
) -> VGGFeatures:
    """A VGG with seeded random weights (He init); ``width`` < 64 narrows every layer, for fast tests."""
    generator = torch.Generator().manual_seed(seed)
    convs, in_channels = [], 3
    for block, n_convs in enumerate(BLOCKS[arch]):
        out_channels = width * 2 ** min(block, 3)
        for _ in range(n_convs):
            std = (2.0 / (in_channels * 9)) ** 0.5
            weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * std
            convs.append((weight, torch.randn(out_channels, generator=generator) * 0.01))
            in_channels = out_channels
    return VGGFeatures(convs, convention=convention, pooling=pooling)
