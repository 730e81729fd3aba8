"""The tiles of a canvas: blocks each tile owns and the crops the network sees for them (tiling.py evaluates them,
memory.py plans with them). Pure geometry: no tensors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import FusionError
from .geometry import feature_shape, layer_reach


def patch_reach(size: int, stride: int) -> tuple[int, int]:
    """The positions (before, after) around a tile's own that its patches need: those starting at its positions
    reach ``size - 1`` further, and the fast search's propagation looks at the ring of patches around them."""
    return stride, stride + size - 1


def tile_layers(
    names: list[str], layers: Iterable[str], patches: Iterable[tuple[str, int, int]], split: str | None = None
) -> dict[str, tuple[int, int]]:
    """The layers a tile's crop must give exactly, each with the positions around the owned ones that must be
    exact too (``TilePlan``'s ``extra``): the layers in use up to ``split`` (all without one) and ``split`` itself;
    for each patch term (layer, patch size, stride) in them, its patches' reach."""
    depth = len(names) if split is None else names.index(split)
    extra = {layer: (0, 0) for layer in layers if names.index(layer) <= depth}
    if split is not None:
        extra[split] = (0, 0)
    for layer, size, stride in patches:
        if layer in extra:
            extra[layer] = patch_reach(size, stride)
    return extra


@dataclass(frozen=True)
class Tile:
    """A block of the canvas (``block``: rows, cols in px) and the crop the network sees for it."""

    block: tuple[range, range]
    crop: tuple[slice, slice]


class TilePlan:
    """The tiles of a canvas of ``shape`` whose crops are at most ``tile`` px on a side.

    ``extra`` gives, per layer in use, the positions (before, after) around the owned ones that must be exact too
    (a patch starting at an owned position reaches ``patch_size - 1`` further; the fast search's propagation
    looks one patch around). Block edges are multiples of the deepest layer's stride, so every layer's positions
    split between the tiles without overlap. Along each axis every crop but the last has the first's size and the
    last is no larger (``_split``)."""

    def __init__(self, names: list[str], shape: tuple[int, int], extra: dict[str, tuple[int, int]], tile: int) -> None:
        reaches = {layer: layer_reach(names, layer) for layer in extra}
        self.shape, self.names = shape, names
        self.align = max(reach.stride for reach in reaches.values())
        before = max(r.before + extra[layer][0] * r.stride for layer, r in reaches.items())
        self.before = -(-before // self.align) * self.align  # crops start on a multiple of the stride
        self.after = max(r.after + (extra[layer][1] - 1) * r.stride + 1 for layer, r in reaches.items())
        self.strides = {layer: reach.stride for layer, reach in reaches.items()}
        axes = [self._split(length, tile) for length in shape]
        self.tiles = [
            Tile((rows, cols), (row_crop, col_crop)) for rows, row_crop in axes[0] for cols, col_crop in axes[1]
        ]

    def _split(self, length: int, tile: int) -> list[tuple[range, slice]]:
        """The fewest blocks of ``length`` px, with their crops, whose crops are at most ``tile`` px. Every crop
        but the last has the first's width and the last is no wider, so the blocks one tile's passes free hold
        the next tile's activations and gradients: crops of varying sizes (blocks cut evenly, each with its own
        halo) left the C allocator's heap with holes too small for the next tile (BENCHMARKS.md). The
        edge blocks are the wider by the halo they lack on one side; the positions computed are those of blocks
        plus halos, give or take the stride per crop."""
        for count in range(1, length // self.align + 2):
            width = min(length, -(-(length + (count - 1) * (self.before + self.after)) // count))  # the narrowest
            while width <= min(tile, length):
                split = self._crops(length, width)
                if split is not None and len(split) <= count:
                    return split
                width += 1
        smallest = self.align + self.before + self.after
        raise FusionError(
            f"tile: {tile} px is too small for the layers in use; give at least {smallest} px (their receptive "
            "field around one block), or 0 for automatic"
        )

    def _crops(self, length: int, width: int) -> list[tuple[range, slice]] | None:
        """Blocks of ``length`` px, each with its crop, from the start on: each crop ``width`` px (the last up to
        the end), each block as long as its crop covers it with its halo; None where ``width`` is too small to
        make progress."""
        split, edge, start = [], 0, 0
        while start + width < length:
            stop = (start + width - self.after) // self.align * self.align  # a multiple of the stride
            if stop <= edge or stop < self.before:
                return None
            split.append((range(edge, stop), slice(start, start + width)))
            edge, start = stop, stop - self.before
        split.append((range(edge, length), slice(start, length)))
        return split

    def owned(self, tile: Tile, layer: str) -> tuple[range, range]:
        """The positions of ``layer`` (rows, cols, whole-map coordinates) that ``tile`` owns."""
        stride, sizes = self.strides[layer], feature_shape(self.shape, layer)
        return tuple(
            range(block.start // stride, size if block.stop == length else block.stop // stride)
            for block, size, length in zip(tile.block, sizes, self.shape, strict=True)
        )

    def origin(self, tile: Tile, layer: str) -> tuple[int, int]:
        """The whole-map position of the first position of ``layer`` in ``tile``'s crop."""
        stride = self.strides[layer]
        return tile.crop[0].start // stride, tile.crop[1].start // stride

    def local(self, tile: Tile, layer: str) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(the owned positions of ``layer`` in the crop's activation, the same in whole-map coordinates)."""
        owned, origin = self.owned(tile, layer), self.origin(tile, layer)
        local = tuple(slice(r.start - o, r.stop - o) for r, o in zip(owned, origin, strict=True))
        return local, tuple(slice(r.start, r.stop) for r in owned)
