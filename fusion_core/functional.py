"""Pure functions behind the loss modules: Gram matrices, patch geometry and the MRF patch loss.

Feature maps are (1, C, H, W). Patches are indexed row-major over the grid of patch positions,
the order ``F.unfold`` uses, so index ``i`` is grid row ``i // cols``, column ``i % cols``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import accumulation_dtype

_EPS = 1e-8


def gram_matrix(features: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, C, H, W) -> (B, C, C): channel correlations averaged over positions.

    With ``mask`` (broadcastable to (B, 1, H, W), soft values allowed) this is the guided Gram
    matrix of Gatys et al. 2017: features are weighted by the mask and the average is taken over
    the mask's weight, so a region's Gram does not depend on how large the region is.
    """
    b, c, h, w = features.shape
    if mask is None:
        return gram_part(features, None, 1.0 / (h * w))
    weight = mask.expand(b, 1, h, w).to(features.dtype)
    if weight.requires_grad:  # a mask being optimised: let autograd differentiate through it too
        flat, weight = channels_by_positions(features), weight.reshape(b, 1, h * w)
        weighted = flat * weight
        return weighted @ weighted.transpose(1, 2) / weight.square().sum(-1, keepdim=True).clamp_min(_EPS)
    # (F w)(F w)^T / sum(w^2) = F diag(w^2) F^T / sum(w^2)
    square = weight.square()
    return gram_part(features, square, 1.0 / square.sum((-2, -1), keepdim=True).clamp_min(_EPS))


def gram_part(features: Tensor, square_weight: Tensor | None, scale: float | Tensor) -> Tensor:
    """F diag(v) F^T * scale for a (B, C, H, W) map F and per-position weights v (B, 1, H, W) or None (all 1).

    The Gram matrix of a whole map is one such part with scale 1 / sum(v); the parts of the tiles of a map, each
    with the whole map's scale, add up to it (tiling.py)."""
    scale = _batch_scale(scale, features.shape[0])
    rows = _window_rows(features, square_weight)
    if rows is not None:
        return _RowGram.apply(*rows, scale)
    flat, weight = _flat_positions(features, square_weight)
    return _Gram.apply(flat, weight, scale)


def gram_part_grad(features: Tensor, square_weight: Tensor | None, scale: float | Tensor, slope: Tensor) -> Tensor:
    """The gradient of <slope, gram_part(features, square_weight, scale)> with respect to ``features``, in their
    layout: what autograd computes through ``gram_part`` (``_RowGram`` / ``_Gram``'s backward), without the part
    itself, which the tiled evaluation's second pass does not need (tiling.py: it has the Gram matrices from the
    first)."""
    b, c, h, w = features.shape
    scale = _batch_scale(scale, b)
    rows = _window_rows(features, square_weight)
    if rows is not None:
        return _RowGram.grad(*rows, scale, slope.to(features.dtype)).permute(2, 0, 1).unsqueeze(0)
    flat, weight = _flat_positions(features, square_weight)
    grad = _Gram.grad(flat, weight, scale, slope.to(features.dtype).reshape(-1, c, c))
    if grad.stride(-1) == 1:
        return grad.reshape(b, c, h, w)
    return grad.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)  # positions-last, as F is


def _batch_scale(scale: float | Tensor, b: int) -> float | Tensor:
    return scale.reshape(b, 1, 1) if torch.is_tensor(scale) and scale.dim() == 4 else scale


def _window_rows(features: Tensor, square_weight: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    """A window of a channels-last map (a tile's positions) as rows (h, w, C) of positions and weights (h, w, 1),
    views; None for any other map. Each row of such a window is contiguous, the window is not, and flattening it
    would copy it whole. (squeeze, not [0]: a selection's backward pass writes its gradient into zeros.)"""
    if not (features.shape[0] == 1 and features.stride(1) == 1):
        return None
    if memory_format_of(features) != torch.contiguous_format:
        return None
    rows = features.squeeze(0).permute(1, 2, 0)
    weight = None if square_weight is None else square_weight.squeeze(0).permute(1, 2, 0).to(features.dtype)
    return rows, weight


def _flat_positions(features: Tensor, square_weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(B, C, H * W) views of the map and (B, 1, H * W) weights."""
    b, _, h, w = features.shape
    weight = None if square_weight is None else square_weight.reshape(b, 1, h * w).to(features.dtype)
    return channels_by_positions(features), weight


def memory_format_of(features: Tensor) -> torch.memory_format:
    """channels_last for a map stored positions-last (as the VGG pass stores them on CPU and CUDA)."""
    if features.is_contiguous() or not features.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def channels_by_positions(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H * W), a view in either memory layout (a matrix product reads both)."""
    if memory_format_of(features) == torch.channels_last:
        return features.permute(0, 2, 3, 1).flatten(1, 2).transpose(1, 2)
    return features.reshape(*features.shape[:2], -1)


class _Gram(torch.autograd.Function):
    """G = (F * v) F^T * scale for F (B, C, N), optional per-position weights v (B, 1, N).

    Autograd would differentiate the product of F and its transpose as two matrix products plus a
    transposed copy of an (N, C) gradient; G's symmetry gives dF = (dG + dG^T)(F * v) * scale, one
    product. On the first VGG layers (N = H * W) this saves about a tenth of an iteration.
    The gradient is written in F's layout, so the backward pass never converts between layouts.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, weight: Tensor | None, scale: float | Tensor) -> Tensor:
        weighted = flat if weight is None else flat * weight
        ctx.save_for_backward(flat, weight)
        ctx.scale = scale
        return weighted @ flat.transpose(1, 2) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _Gram.grad(*ctx.saved_tensors, ctx.scale, grad), None, None

    @staticmethod
    def grad(flat: Tensor, weight: Tensor | None, scale: float | Tensor, grad: Tensor) -> Tensor:
        """dL/dF from dL/dG = ``grad``, in F's layout."""
        weighted = flat if weight is None else flat * weight
        symmetric = (grad + grad.transpose(1, 2)) * scale
        if flat.stride(-1) == 1:
            return symmetric @ weighted
        return (weighted.transpose(1, 2) @ symmetric).transpose(1, 2)  # positions-last, as F is


class _RowGram(torch.autograd.Function):
    """``_Gram`` for rows X (R, N, C) of positions, v (R, N, 1): G = sum_r X_r^T diag(v_r) X_r * scale, (1, C, C).
    One batched product of the rows and a sum over them; the gradient (R, N, C) is positions-last, as X is."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor | None, scale: float | Tensor) -> Tensor:
        weighted = rows if weight is None else rows * weight
        ctx.save_for_backward(rows, weight)
        ctx.scale = scale
        return (torch.bmm(weighted.transpose(1, 2), rows).sum(0, keepdim=True) * scale).reshape(1, rows.shape[2], -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _RowGram.grad(*ctx.saved_tensors, ctx.scale, grad), None, None

    @staticmethod
    def grad(rows: Tensor, weight: Tensor | None, scale: float | Tensor, grad: Tensor) -> Tensor:
        """dL/dX (R, N, C) from dL/dG = ``grad``, positions-last as X is."""
        weighted = rows if weight is None else rows * weight
        symmetric = ((grad + grad.transpose(-1, -2)) * scale).reshape(grad.shape[-2:])
        return torch.matmul(weighted, symmetric)


def gram_loss(features: Tensor, target_gram: Tensor, mask: Tensor | None = None) -> Tensor:
    """Relative squared error of the Gram matrix: ||G - G_target||^2 / ||G_target||^2."""
    return gram_distance(gram_matrix(features, mask), target_gram)


def gram_distance(gram: Tensor, target_gram: Tensor) -> Tensor:
    """||G - G_target||^2 / ||G_target||^2."""
    return (gram - target_gram).square().sum() / target_gram.square().sum().clamp_min(_EPS)


def gram_scale(square_weight: Tensor | None, positions: int) -> float | Tensor:
    """The Gram matrix's normalisation for a map of ``positions`` positions: 1 / positions, or with a mask
    (``square_weight``: the mask squared, at the layer's size) 1 / the mask's weight (``gram_matrix``)."""
    return 1.0 / positions if square_weight is None else 1.0 / square_weight.sum().clamp_min(_EPS)


def content_loss(features: Tensor, target: Tensor, energy: float | Tensor) -> Tensor:
    """Mean squared feature distance in units of ``energy`` (a mean squared activation)."""
    return content_distance(features, target, features.numel(), energy)


def content_distance(features: Tensor, target: Tensor, count: int, energy: float | Tensor) -> Tensor:
    """The squared distance of ``features`` to ``target`` over ``count`` values (a tile's share when ``features``
    is part of the map), in units of ``energy``: ``content_loss`` summed over a map's parts."""
    # sum / count rather than mean(): autograd then returns the gradient in the features' memory layout
    return (features - target).square().sum() / (count * max(float(energy), _EPS))


def total_variation_loss(image: Tensor) -> Tensor:
    """Mean squared difference between neighbouring pixels."""
    return total_variation_of_band(image, image.shape)


def total_variation_of_band(band: Tensor, shape: torch.Size | tuple[int, ...], rows: int | None = None) -> Tensor:
    """``band``'s share of ``total_variation_loss`` of an image of ``shape`` (N, C, H, W) that the band is a run of
    rows of: vertical differences within the band, horizontal ones on its first ``rows`` rows (default all). A band
    that passes the row below its own as well (and ``rows`` its own count) gets every difference of the image counted
    once over all bands."""
    channels, height, width = shape[-3:]
    vertical, horizontal = channels * (height - 1) * width, channels * height * (width - 1)
    dy = (band[..., 1:, :] - band[..., :-1, :]).square().sum()
    dx = (band[..., :rows, 1:] - band[..., :rows, :-1]).square().sum()
    return dy / max(vertical, 1) + dx / max(horizontal, 1)


def patch_grid(height: int, width: int, size: int, stride: int) -> tuple[int, int]:
    """Rows and columns of patch positions in a (height, width) map."""
    return (height - size) // stride + 1, (width - size) // stride + 1


def patches(features: Tensor, size: int, stride: int, rows: slice = slice(None)) -> Tensor:
    """Patches of grid rows ``rows`` as an (N, C * size * size) matrix."""
    n_rows, _ = patch_grid(features.shape[-2], features.shape[-1], size, stride)
    start, stop, _ = rows.indices(n_rows)
    band = features[..., start * stride : (stop - 1) * stride + size, :]
    return F.unfold(band, size, stride=stride)[0].T


def positions_last(features: Tensor) -> Tensor:
    """(1, C, H, W) -> (H * W, C): one row per position, so gathering a position reads C contiguous values.
    A view of a channels-last map, a copy of any other (``reshape`` alone would give a channels-first map as a
    strided view, whose rows are C values H * W apart: gathering them is ~60x slower)."""
    return features[0].permute(1, 2, 0).reshape(-1, features.shape[1]).contiguous()


def patch_starts(index: Tensor, shape: tuple[int, int], size: int, stride: int) -> Tensor:
    """Flat position (y * W + x) of the top-left corner of patch number ``index`` on a map of ``shape``;
    the patch's offset (dy, dx) is then at ``start + dy * W + dx``."""
    _, cols = patch_grid(*shape, size, stride)
    return (index // cols) * stride * shape[1] + (index % cols) * stride


def patch_norms(features: Tensor, size: int, stride: int) -> Tensor:
    """L2 norm of every patch, (N,), without unfolding them all."""
    energy = features.square().sum(1, keepdim=True)
    ones = torch.ones(1, 1, size, size, dtype=features.dtype, device=features.device)
    return F.conv2d(energy, ones, stride=stride).flatten().clamp_min(0).sqrt()


def patch_weights(mask: Tensor, size: int, stride: int) -> Tensor:
    """Per-patch weight from a (H, W) mask at the feature resolution: the mask at each patch centre."""
    centre = size // 2
    return mask[
        centre : centre + (mask.shape[-2] - size) + 1 : stride, centre : centre + (mask.shape[-1] - size) + 1 : stride
    ].flatten()


def mrf_targets(
    style: Tensor,
    indices: Tensor,
    shape: tuple[int, int],
    size: int,
    stride: int,
    weights: Tensor | None = None,
    patch_energy: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Summarise the matched style patches as per-position maps, for ``mrf_loss``.

    ``indices[i]`` is the style patch matched to output patch ``i`` on a map of ``shape``. Returns
    (coverage, mean target, residual): ``coverage`` (1, 1, H, W) is the total weight of the patches
    covering each position, ``mean target`` (1, C, H, W) their weighted mean matched value there,
    and ``residual`` the part of the loss no output can remove (matched patches that overlap
    disagree). ``patch_energy``, the squared norm of every style patch, may be given when the same style map is
    matched again.
    """
    coverage, mean = matched_means(style, indices, shape, patch_grid(*shape, size, stride), size, stride, weights)
    residual = matched_energy(style, indices, size, stride, weights, patch_energy) - covered_energy(coverage, mean)
    return coverage, mean, residual.clamp_min(0).to(style.dtype)


def matched_means(
    style: Tensor,
    indices: Tensor,
    shape: tuple[int, int],
    grid: tuple[int, int],
    size: int,
    stride: int,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(coverage, mean target) of ``mrf_targets`` on a map of ``shape`` holding a ``grid`` (rows, cols) of patches
    whose matches are ``indices``; a map larger than the grid reaches has coverage 0 beyond it. Built patch offset
    by patch offset, so no patch matrix is ever held."""
    height, width = shape
    rows, cols = grid
    channels = style.shape[1]
    style_rows = positions_last(style)
    starts = patch_starts(indices, tuple(style.shape[-2:]), size, stride)
    w = torch.ones(rows * cols, dtype=style.dtype, device=style.device) if weights is None else weights.to(style.dtype)
    coverage = style.new_zeros(1, 1, height, width)
    weighted_sum = style.new_zeros(height, width, channels)  # positions last too, transposed once at the end
    for dy in range(size):
        for dx in range(size):
            source = style_rows.index_select(0, starts + dy * style.shape[-1] + dx)  # (N, C)
            if weights is not None:
                source = source * w[:, None]
            here = (slice(dy, dy + (rows - 1) * stride + 1, stride), slice(dx, dx + (cols - 1) * stride + 1, stride))
            coverage[0, 0][here] += w.view(rows, cols)
            weighted_sum[here] += source.view(rows, cols, channels)
    mean = weighted_sum.div_(coverage[0, 0, :, :, None].clamp_min(_EPS))
    return coverage, mean.permute(2, 0, 1)[None].contiguous(memory_format=memory_format_of(style))


def matched_energy(
    style: Tensor,
    indices: Tensor,
    size: int,
    stride: int,
    weights: Tensor | None = None,
    patch_energy: Tensor | None = None,
) -> Tensor:
    """sum_i w_i ||matched style patch_i||^2, in float64 where the device has it cheaply
    (``precision.accumulation_dtype``): the residual is a small difference of large sums. It is a constant of the
    loss, so float32 (on GPUs) changes the reported value only, never the gradient."""
    wide = accumulation_dtype(style.device)
    if patch_energy is None:
        patch_energy = patch_norms(style.to(wide), size, stride).square()
    energy = patch_energy[indices].to(wide)
    return energy.sum() if weights is None else (energy * weights.to(wide)).sum()


def covered_energy(coverage: Tensor, mean: Tensor) -> Tensor:
    """sum over positions of coverage * |mean target|^2, accumulated as ``matched_energy`` is."""
    wide = accumulation_dtype(mean.device)
    coverage_wide = coverage.to(wide)
    # a few channels at a time: a whole float64 copy of the map would be the largest object here
    return sum((coverage_wide * part.to(wide).square()).sum() for part in mean.split(16, dim=1))


def mrf_loss(features: Tensor, coverage: Tensor, mean_target: Tensor, residual: Tensor) -> Tensor:
    """Sum over output patches i of w_i * ||patch_i(features) - matched style patch_i||^2.

    Written per position (each position appears in up to size^2 patches) rather than per patch:
    equal to the patch sum, with the same gradient, at the memory of one feature map.
    """
    difference = features - mean_target
    # Written so that autograd returns the gradient in the features' memory layout (channels-last from the
    # VGG pass): coverage * difference.square() would give a channels-first gradient, and mixing the two
    # layouts in the backward pass costs a slow copy at every addition.
    return (coverage * difference * difference).sum() + residual
