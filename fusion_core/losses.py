"""Loss modules for one pyramid level: targets are computed once and held as buffers.

Each module takes the dict of VGG activations of the current image and returns an unweighted
scalar; the optimiser applies the weights a1, a2, a3.

Normalisation. Every term is a relative error, so it does not change with the image size (the
pyramid levels stay in balance) nor with the scale of the network's activations (Caffe-convention
features are ~50x larger than torchvision ones); docs/method.md "Loss normalisation" has the measurements.
- global: ||G - G_style||^2 / ||G_style||^2 per layer, averaged over the layers;
- content: CONTENT_SCALE x the mean squared distance to the content features, in units of the style
  images' mean squared activation on the same layer (the unit the local term uses too);
- local: the mean over output patches of ||p - s_match||^2 / (mean ||s||^2 over style patches),
  times LOCAL_SCALE. CNNMRF sums raw patch distances on 0..255 Caffe activations, which is why the
  paper's a2 (1e-4) is ~1e5 below a1; LOCAL_SCALE keeps a2 on the paper's scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as Fn
from .matching import MATCHERS, Matcher
from .precision import accumulation_dtype

# Chosen with benchmarks/quality.py (docs/RESULTS.md): at a1 = 20, a2 = 1e-4, a3 = 20 the output moves about as
# far from the photo as the classic tools' outputs do while taking the style's strokes; the local term pulls as
# hard as it can without pasting the style's motifs into the photo.
# Both are ratios of relative errors, so they hold for any network's activation scale.
LOCAL_SCALE = 1e5
CONTENT_SCALE = 0.2


class GramLoss(nn.Module):
    """Gram loss against fixed style Grams (``functional.gram_matrix`` of the style's features, guided by its
    style mask), optionally guided by a target mask per layer."""

    def __init__(self, style_grams: dict[str, Tensor], target_masks: dict[str, Tensor | None] | None = None) -> None:
        super().__init__()
        self.layers = tuple(style_grams)
        self.target_masks = target_masks or {}
        for layer, gram in style_grams.items():
            self.register_buffer(f"gram_{layer}", gram.detach())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for layer in self.layers:
            total = total + Fn.gram_loss(features[layer], getattr(self, f"gram_{layer}"), self.target_masks.get(layer))
        return total / len(self.layers)

    # The tiled evaluation (tiling.py): the Gram matrices of the whole map as sums of parts, then the loss of them.

    def part(self, layer: str, features: Tensor, window: tuple[slice, slice], shape: tuple[int, int]) -> Tensor:
        """The part of ``layer``'s Gram matrix from ``features``, the positions ``window`` of a map of ``shape``."""
        return Fn.gram_part(features, *self._part_weights(layer, window, shape, features.dtype))

    def part_grad(
        self, layer: str, features: Tensor, window: tuple[slice, slice], shape: tuple[int, int], slope: Tensor
    ) -> Tensor:
        """The gradient of <``slope``, ``part(layer, features, window, shape)``> with respect to ``features``."""
        return Fn.gram_part_grad(features, *self._part_weights(layer, window, shape, features.dtype), slope)

    def _part_weights(
        self, layer: str, window: tuple[slice, slice], shape: tuple[int, int], dtype: torch.dtype
    ) -> tuple[Tensor | None, float | Tensor]:
        """The per-position weights of ``window`` (the target mask squared, or None) and the whole map's scale."""
        mask = self.target_masks.get(layer)
        if mask is None:
            return None, Fn.gram_scale(None, shape[0] * shape[1])
        square = mask.to(dtype).square()
        return square[window][None, None], Fn.gram_scale(square, 0)

    def loss_of(self, grams: dict[str, Tensor]) -> Tensor:
        """The loss of the whole map's Gram matrices ``grams``: ``forward``'s value."""
        total = 0.0
        for layer in self.layers:
            total = total + Fn.gram_distance(grams[layer], getattr(self, f"gram_{layer}"))
        return total / len(self.layers)


class ContentLoss(nn.Module):
    """Feature distance to the content image; ``energy`` is the unit (see the module docstring)."""

    def __init__(self, layer: str, target: Tensor, energy: float) -> None:
        super().__init__()
        self.layer, self.layers, self.energy = layer, (layer,), energy
        self.register_buffer("target", target.detach())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return CONTENT_SCALE * Fn.content_loss(features[self.layer], self.target, self.energy)

    def part(self, features: Tensor, window: tuple[slice, slice]) -> Tensor:
        """The loss's share from ``features``, the positions ``window`` of the map (tiling.py)."""
        target = self.target[..., window[0], window[1]]
        return CONTENT_SCALE * Fn.content_distance(features, target, self.target.numel(), self.energy)


class PatchLoss(nn.Module):
    """MRF loss on one layer. ``match`` (no autograd) picks the nearest style patches; ``forward``
    pulls every output patch toward its match. The optimiser decides when to call ``match``.

    ``matcher`` names the search in ``matching.MATCHERS``; it is built for the style map at the first
    ``match`` and kept, so per-style work (the fast search's projection) is done once per level. ``metric`` is what
    "nearest" means (``matching.METRICS``): "correlation" (Li and Wand, the paper) or "distance".

    ``guide`` (the content image's map on this layer) and ``guide_share`` in [0, 1]: the nearest style patches are
    searched for ``(1 - guide_share) * output + guide_share * guide`` rather than for the output alone (0, as Li
    and Wand do). This differs from the paper. A search that sees only the output feeds on itself: a dark
    reflection with a light spot in a photo's water is nearest to a painted eye, is pulled toward it, and so is
    nearer still at the next search, until the eye is painted there. The content's share anchors each search to
    what the photo shows at that place; the pull itself is still toward the matched style patch.
    """

    def __init__(
        self,
        layer: str,
        style_features: Tensor,
        patch_size: int = 3,
        stride: int = 1,
        *,
        style_eligible: Tensor | None = None,
        target_weights: Tensor | None = None,
        matcher: str = "exact",
        metric: str = "correlation",
        guide: Tensor | None = None,
        guide_share: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer, self.layers = layer, (layer,)
        self.patch_size, self.stride, self.matcher, self.metric = patch_size, stride, matcher, metric
        self.register_buffer("style", style_features.detach())
        if guide_share > 0 and guide is None:
            raise ValueError("guide_share > 0 needs a guide map")
        self.guide, self.guide_share = (guide.detach() if guide_share > 0 else None), guide_share
        self.style_eligible = style_eligible
        self.target_weights = target_weights
        # squared norm of every style patch, in float64 where the device has it cheaply (precision.py)
        wide = accumulation_dtype(self.style.device)
        self.style_energy = Fn.patch_norms(self.style.to(wide), patch_size, stride).square()
        energy = self.style_energy if style_eligible is None else self.style_energy[style_eligible]
        self.patch_energy = float(energy.mean())
        # the sum of the per-patch weights (the loss is a weighted mean over patches), read once per level
        self.total_weight = None if target_weights is None else float(target_weights.sum())
        self.indices: Tensor | None = None  # last match, for inspection
        self._targets: tuple[Tensor, Tensor, Tensor] | None = None
        self._search: Matcher | None = None

    def searcher(self) -> Matcher:
        """The matcher for this style map, built at the first match and kept for the level."""
        if self._search is None:
            self._search = MATCHERS[self.matcher](
                self.style, self.patch_size, self.stride, self.style_eligible, metric=self.metric
            )
        return self._search

    def query(self, features: Tensor, origin: tuple[int, int] = (0, 0)) -> Tensor:
        """What the nearest style patches are searched for, for ``features``, a window of the layer's map whose
        first position is ``origin``: the features themselves, or their blend with the guide's same window."""
        if self.guide is None:
            return features
        (top, left), (height, width) = origin, features.shape[-2:]
        guide = self.guide[..., top : top + height, left : left + width]
        return torch.lerp(features.float(), guide.float(), self.guide_share)

    @torch.no_grad()
    def match(self, features: dict[str, Tensor]) -> bool:
        """Search the nearest style patches of ``features``' map on this layer; returns whether the search was a full
        one (it frees large blocks: the level loop has the C allocator give them back, ``allocator.trim_heaps``)."""
        current = features[self.layer].detach()
        # the fast search keeps the last match a candidate
        self.indices = self.searcher()(self.query(current), self.indices)
        self._targets = Fn.mrf_targets(
            self.style,
            self.indices,
            tuple(current.shape[-2:]),
            self.patch_size,
            self.stride,
            self.target_weights,
            self.style_energy,
        )
        return self.searcher().last_full

    def set_matches(self, indices: Tensor) -> None:
        """The matches of the whole map, found elsewhere (in parts, tile by tile: tiling.TiledMatch); the loss is then
        evaluated in parts (``part``)."""
        self.indices, self._targets = indices, None

    # The tiled evaluation (tiling.py): the loss of a tile's positions from the matches of the patches covering them.

    def part(self, features: Tensor, window: tuple[slice, slice], shape: tuple[int, int]) -> Tensor:
        """The loss's share from ``features``, the positions ``window`` (start and stop set) of a map of ``shape``:
        the pull toward the matches of every patch covering them, and the residual of the patches whose first
        position lies in the window."""
        step, size = self.stride, self.patch_size
        rows, cols = Fn.patch_grid(*shape, size, step)
        grid = self.indices.view(rows, cols)
        weights = None if self.target_weights is None else self.target_weights.view(rows, cols)
        # the patches covering the window, and those starting in it (whose residual this part counts)
        (i0, i1), (j0, j1) = (_covering(w, size, step, n) for w, n in ((window[0], rows), (window[1], cols)))
        (o0, o1), (p0, p1) = (
            (-(-w.start // step), min(n, -(-w.stop // step))) for w, n in zip(window, (rows, cols), strict=True)
        )
        top, left = i0 * step, j0 * step
        height = max(window[0].stop, (i1 - 1) * step + size) - top
        width = max(window[1].stop, (j1 - 1) * step + size) - left
        near = grid[i0:i1, j0:j1].reshape(-1)
        near_weights = None if weights is None else weights[i0:i1, j0:j1].reshape(-1)
        coverage, mean = Fn.matched_means(
            self.style, near, (height, width), (i1 - i0, j1 - j0), size, step, near_weights
        )
        inside = (
            slice(window[0].start - top, window[0].stop - top),
            slice(window[1].start - left, window[1].stop - left),
        )
        coverage, mean = coverage[..., inside[0], inside[1]], mean[..., inside[0], inside[1]]
        own = grid[o0:o1, p0:p1].reshape(-1)
        own_weights = None if weights is None else weights[o0:o1, p0:p1].reshape(-1)
        residual = Fn.matched_energy(self.style, own, size, step, own_weights, self.style_energy)
        residual = (residual - Fn.covered_energy(coverage, mean)).to(self.style.dtype)
        total_weight = rows * cols if self.total_weight is None else self.total_weight
        normaliser = max(total_weight, 1e-8) * max(self.patch_energy, 1e-8)
        return LOCAL_SCALE * Fn.mrf_loss(features, coverage, mean, residual) / normaliser

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        if self._targets is None:
            self.match(features)
        coverage = self._targets[0]
        patch_weight = coverage.sum() / self.patch_size**2  # sum of the per-patch weights
        normaliser = patch_weight.clamp_min(1e-8) * max(self.patch_energy, 1e-8)
        return LOCAL_SCALE * Fn.mrf_loss(features[self.layer], *self._targets) / normaliser


def _covering(window: slice, size: int, stride: int, count: int) -> tuple[int, int]:
    """The patches (first, last + 1) of a grid of ``count`` that cover any position of ``window``."""
    return max(0, -(-(window.start - size + 1) // stride)), min(count, (window.stop - 1) // stride + 1)


class TVLoss(nn.Module):
    def forward(self, image: Tensor) -> Tensor:
        return Fn.total_variation_loss(image)
