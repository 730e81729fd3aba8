"""Sizes: the pyramid's levels, a style image's size at a level, a layer's feature map and receptive field, the
mirrored margin. Layers are named as VGG's (``relu3_1``, ``pool2``); every network here is 3x3 convolutions and 2x2
pools."""

from __future__ import annotations

from dataclasses import dataclass

BORDER_FRACTION = 1 / 64  # of a level's longest side: the mirrored margin it is optimised with (border_margin)


def fit_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) scaled so the longer side is ``longest``, aspect ratio kept."""
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def level_shapes(height: int, width: int, size: int, levels: int) -> list[tuple[int, int]]:
    """Output shape of each level, coarsest first; each level is twice the one before, the last ``size``."""
    return [fit_longest(height, width, max(1, round(size / 2 ** (levels - 1 - i)))) for i in range(levels)]


def style_shape(style: tuple[int, int], output: tuple[int, int], scale: float = 1.0) -> tuple[int, int]:
    """The size a style image of shape ``style`` is used at for an output of shape ``output``: its longest side
    ``scale`` times the output's (a scale > 1 gives larger brush strokes)."""
    return fit_longest(style[0], style[1], round(max(output) * scale))


def feature_shape(shape: tuple[int, int], layer: str) -> tuple[int, int]:
    """Spatial shape of VGG layer ``layer``'s activation (``relu3_1``, ``pool2``) for an input of ``shape``:
    every pool before it halves the size, rounding down."""
    h, w = shape
    block = int(layer[4:].split("_")[0])
    for _ in range(block if layer.startswith("pool") else block - 1):
        h, w = h // 2, w // 2
    return h, w


def border_margin(shape: tuple[int, int]) -> int:
    """Pixels of mirrored margin around a level's image while it is optimised (BORDER_FRACTION of its longest side,
    at least 4), cropped off afterwards.

    The outermost pixels of an image are seen by fewer of the network's windows than any other, so they are the
    least held by the losses, and the optimiser paints them with stripes of colours in neither image. With a
    margin, every pixel of the picture is an inner one; the margin itself, optimised with the rest, is dropped.
    """
    return max(4, round(max(shape) * BORDER_FRACTION))


def with_margin(shape: tuple[int, int], margin: int) -> tuple[int, int]:
    """The canvas a level of ``shape`` is optimised on: the image with ``margin`` px on every side."""
    return shape[0] + 2 * margin, shape[1] + 2 * margin


@dataclass(frozen=True)
class Reach:
    """What position p of a layer is computed from: input pixels p * stride - before .. p * stride + after."""

    stride: int
    before: int
    after: int


def layer_reach(names: list[str], layer: str) -> Reach:
    """The receptive field of ``layer`` in the network whose layers are ``names`` (3x3 convs, 2x2 pools)."""
    before = after = 0
    stride = 1
    for name in names[: names.index(layer) + 1]:
        if name.startswith("conv"):
            before, after = before + stride, after + stride
        elif name.startswith("pool"):
            after, stride = after + stride, stride * 2
    return Reach(stride, before, after)
