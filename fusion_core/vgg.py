"""VGG16/VGG19 feature extractor with named layers (``relu3_1``), built from a state dict.

The network is rebuilt from the weights alone: the architecture is told by the number of conv layers
(13 = VGG16, 16 = VGG19) and the channel widths are read from the weight shapes, so tests can use a
narrow VGG with random weights. Only layers up to the deepest one asked for are ever run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lean_backward as lean
from .errors import FusionError
from .precision import memory_format

# Convs per block.
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
CONVENTIONS = ("torchvision", "caffe")
POOLINGS = ("max", "avg")

_TORCHVISION_MEAN = (0.485, 0.456, 0.406)
_TORCHVISION_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def layer_names(arch: str) -> list[str]:
    """All tappable layers in order: conv1_1, relu1_1, ..., pool1, ..."""
    names = []
    for block, n_convs in enumerate(BLOCKS[arch], start=1):
        for i in range(1, n_convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


def loss_layers(arch: str) -> list[str]:
    """The layers a loss can use: every ReLU and pooling output (the conv outputs are tappable but not offered)."""
    return [name for name in layer_names(arch) if not name.startswith("conv")]


class VGGFeatures(nn.Module):
    """Frozen VGG trunk; ``forward(image, layers)`` returns ``{name: activation}``.

    ``image`` is RGB in 0..1 with shape (B, 3, H, W); the input convention of the weights
    (torchvision or Caffe) is applied inside, so callers never think about it. The activations come in the
    layout the device's convolutions run fastest in (``precision.memory_format``). ``lean_backward`` switches
    the memory-saving backward pass (lean_backward.py) on or off.
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
        self.lean_backward = True
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

    def convs_before(self, layer: int) -> int:
        """How many conv layers come before the layer at index ``layer`` of ``names``."""
        return sum(1 for name in self.names[:layer] if name.startswith("conv"))

    def make_autograd_ready(self) -> None:
        """Replace inference tensors among the weights (a model built under ``torch.inference_mode()``, as ComfyUI
        runs its loader nodes) by ordinary copies, which autograd can save for a backward pass; other weights are
        left as they are. Idempotent."""
        for module in self.modules():
            for name, tensor in list(module.named_parameters(recurse=False)):
                if tensor.is_inference():
                    module.register_parameter(name, nn.Parameter(tensor.clone(), requires_grad=False))
            for name, tensor in list(module.named_buffers(recurse=False)):
                if tensor.is_inference():
                    module.register_buffer(name, tensor.clone())

    def channels(self, layer: str) -> int:
        """The number of channels of ``layer``'s map (that of the last convolution up to it)."""
        return self.convs[self.convs_before(self.names.index(layer) + 1) - 1].out_channels

    def check_layers(self, layers: Iterable[str]) -> None:
        unknown = [name for name in layers if name not in self.names]
        if unknown:
            valid = ", ".join(loss_layers(self.arch))
            raise FusionError(
                f"layers: unknown layer(s) {', '.join(map(repr, unknown))} for {self.arch}; valid: {valid}"
            )

    def normalize(self, image: Tensor) -> Tensor:
        if self.convention == "caffe":
            image = image.flip(1) * 255.0  # RGB 0..1 -> BGR 0..255
        return ((image - self._mean) / self._std).contiguous(memory_format=memory_format(image.device))

    def forward(
        self,
        image: Tensor,
        layers: Iterable[str],
        on_layer: Callable[[str, Tensor], Tensor | None] | None = None,
        *,
        after: str | None = None,
    ) -> dict[str, Tensor]:
        """Activations of ``layers``; ``on_layer(name, activation)`` is called as each one is computed, and a tensor
        it returns takes the activation's place, in the pass and in the result (tiling.py passes each on through a
        function that adds the tile's loss gradients to the activation's in the backward pass).

        ``after`` (a ReLU or pooling layer): ``image`` is that layer's activation, and the pass runs on from the
        next layer (tiling.py runs the shallow layers in tiles and the deep ones on the whole map)."""
        wanted = set(layers)
        self.check_layers(wanted if after is None else wanted | {after})
        first = 0 if after is None else self.names.index(after) + 1
        if after is not None and (after.startswith("conv") or any(self.names.index(n) < first for n in wanted)):
            raise FusionError(f"after: {after!r} must be a ReLU or pooling layer before every layer asked for")
        names = self.names[: max(self.names.index(n) for n in wanted) + 1]
        x = self.normalize(image) if after is None else image.contiguous(memory_format=memory_format(image.device))
        # While autograd records the pass, let the frozen layers keep only what their backward needs.
        frozen = not any(p.requires_grad for p in self.parameters())
        compact = self.lean_backward and frozen and torch.is_grad_enabled() and x.requires_grad
        out: dict[str, Tensor] = {}
        conv_i = self.convs_before(first)
        fused = False  # the ReLU was applied with its conv
        for i, name in enumerate(names[first:], start=first):
            if name.startswith("conv"):
                conv = self.convs[conv_i]
                conv_i += 1
                fused = compact and name not in wanted
                x = lean.conv_relu(x, conv.weight, conv.bias, lean.keeps_output(names, i, wanted)) if fused else conv(x)
            elif name.startswith("relu"):
                if not fused:
                    # In place only when the conv output it overwrites is not one we return.
                    x = F.relu(x, inplace="conv" + name[4:] not in wanted)
            elif self.pooling == "max":
                if compact:
                    x = lean.max_pool(x)
                else:  # autograd's own pooling only where autograd records the pass
                    x = F.max_pool2d(x, 2) if torch.is_grad_enabled() and x.requires_grad else lean.max_of_four(x)
            else:
                x = F.avg_pool2d(x, 2)
            if name in wanted:
                if on_layer is not None:
                    replaced = on_layer(name, x)
                    x = x if replaced is None else replaced
                out[name] = x
        return out


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
