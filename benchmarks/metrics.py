"""Quality measures of a stylised image that do not depend on the loss that produced it.

- style distance: sliced Wasserstein distance (SWD) between the output's and the style image's VGG features
  on relu1_1, relu2_1, relu3_1 and relu4_1, each divided by the style features' RMS activation, averaged over
  the layers. It compares whole feature distributions (every quantile along random directions), not the
  second moments the Gram loss matches nor the nearest patches the MRF loss matches. Lower = closer to the style.
- content distance: ||relu4_2(output) - relu4_2(content)|| / ||relu4_2(content)||. Lower = closer to the content.
- SSIM of luminance against the content (Gaussian window 11, sigma 1.5, valid region only). Higher = closer;
  1 means identical.
- palette distance: sliced Wasserstein distance between the output's RGB pixels and the style image's (values
  0..1), both resized to PALETTE_SIZE px on the long side. It needs no network, so no optimiser can satisfy it
  with feature statistics that no painter's colours would give. Lower = closer to the painting's colours.
- patch distance: for every 3x3 patch of the output's features on relu2_1 and relu4_1, the cosine similarity of
  the most similar 3x3 style patch (exhaustive search); 1 minus its mean, averaged over the two layers. Small when
  every local piece of the output looks like some piece of the style (the style's local detail), whatever its
  place or frequency. The MRF loss works on relu3_1 only, so this is not the quantity any loss optimises.
  Lower = more style-like local detail.
- motif share: the share of the output's 3x3 patches on relu3_1 that are copies of the painting's motifs the photo
  does not call for: their nearest style patch (the local loss's own normalised cross-correlation, exhaustive) has
  its centre inside a motif region (boxes drawn tightly around eyes, a moon: benchmarks/pairs/motifs.json), at least
  half of their neighbours' nearest patches are the same neighbours in the painting (within a position), so that a
  piece of the motif, not one stray patch, sits there, and the content's own nearest patch there is not in a motif
  region. A landscape has no eyes, so a share above a plain Gatys output's of the same pair means motifs pasted
  where the photo has none. Measured at the output's own size, the style at the output's longest side (the scale of
  the last pyramid level).
- local content distance: relu4_2's squared distance to the content summed over square tiles of the map (32 px of
  the image), each over the mean tile's. Its worst tiles are where the output strays most from the photo: a face
  painted into the sky shows there, and they are the crops a contact sheet shows at 1:1.

All plain torch; the network is any ``fusion_core.VGGFeatures``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion_core.functional import patches, positions_last
from fusion_core.geometry import fit_longest
from fusion_core.images import resize
from fusion_core.matching import _gather_patches, nearest_patches

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
CONTENT_LAYER = "relu4_2"
PATCH_LAYERS = ("relu2_1", "relu4_1")
PROJECTIONS = 128
SEED = 0
PALETTE_SIZE = 256


def feature_points(features: Tensor) -> Tensor:
    """(1, C, H, W) or (N, C) -> (N, C): one point per spatial position."""
    if features.ndim == 4:
        if features.shape[0] != 1:
            raise ValueError(f"expected one feature map (1, C, H, W), got shape {tuple(features.shape)}")
        return features[0].flatten(1).T
    if features.ndim != 2:
        raise ValueError(f"expected (1, C, H, W) or (N, C), got shape {tuple(features.shape)}")
    return features


def projections(channels: int, count: int = PROJECTIONS, seed: int = SEED) -> Tensor:
    """(channels, count) random unit directions, the same for a given seed on every machine."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(channels, count, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=0, keepdim=True)


def _on_common_grid(a_sorted: Tensor, b_sorted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two sorted samples (P, Na), (P, Nb) as quantile functions evaluated on a common grid.

    The empirical quantile function of n sorted values is a step function with steps at k / n. On the merged
    steps of both samples, both functions are constant between consecutive steps, so sampling them at each
    interval's midpoint and weighting by the interval's length integrates |Qa - Qb|^p exactly.
    Returns (Qa, Qb) of shape (P, M) and the interval lengths (M,).
    """
    na, nb = a_sorted.shape[-1], b_sorted.shape[-1]
    ta = torch.arange(1, na + 1, dtype=torch.float64) / na
    tb = torch.arange(1, nb + 1, dtype=torch.float64) / nb
    ends = torch.unique(torch.cat([ta, tb]))  # equal fractions give equal doubles (correctly rounded division)
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    middles = ends - lengths / 2
    ia = (middles * na).floor().long().clamp_max(na - 1).to(a_sorted.device)
    ib = (middles * nb).floor().long().clamp_max(nb - 1).to(b_sorted.device)
    return a_sorted[:, ia], b_sorted[:, ib], lengths.to(a_sorted.device)


def sliced_wasserstein(a: Tensor, b: Tensor, *, count: int = PROJECTIONS, seed: int = SEED, p: int = 2) -> float:
    """Sliced p-Wasserstein distance between two feature sets, (1, C, H, W) or (N, C); counts may differ.

    SW_p = (mean over random unit directions theta of W_p(theta . a, theta . b)^p)^(1/p), where W_p between
    1-D samples is the exact distance between their empirical quantile functions.
    """
    a, b = feature_points(a).double(), feature_points(b).double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"channel counts differ: {a.shape[1]} and {b.shape[1]}")
    theta = projections(a.shape[1], count, seed).to(a.device)
    qa, qb, lengths = _on_common_grid((a @ theta).T.sort(dim=1).values, (b @ theta).T.sort(dim=1).values)
    per_direction = ((qa - qb).abs().pow(p) * lengths).sum(dim=1)  # W_p^p along each direction
    return float(per_direction.mean() ** (1.0 / p))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def luminance(image: Tensor) -> Tensor:
    """(1, 3, H, W) RGB in 0..1 -> (1, 1, H, W) luma (ITU-R BT.601)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * weights).sum(1, keepdim=True)


def ssim(x: Tensor, y: Tensor, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004) of two (1, 1, H, W) images over all fully covered window positions."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[:2] != (1, 1):
        raise ValueError(f"expected two (1, 1, H, W) images of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than the {window} px window")
    x, y = x.double(), y.double()
    w = gaussian_window(window, sigma).to(x.device)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx = F.conv2d(x * x, w) - mx**2
    vy = F.conv2d(y * y, w) - my**2
    cxy = F.conv2d(x * y, w) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def style_distance(vgg, output: Tensor, style: Tensor, layers: tuple[str, ...] = STYLE_LAYERS) -> dict[str, float]:
    """Per-layer SWD between ``output``'s and ``style``'s features, each over the style's RMS activation,
    and their mean under "mean". ``style`` should be at the scale the optimiser saw it (longest side = output's)."""
    with torch.no_grad():
        out_f, style_f = vgg(output, layers), vgg(style, layers)
    distances = {}
    for layer in layers:
        rms = float(style_f[layer].double().square().mean().sqrt())
        distances[layer] = sliced_wasserstein(out_f[layer], style_f[layer]) / max(rms, 1e-12)
    distances["mean"] = sum(distances[layer] for layer in layers) / len(layers)
    return distances


def content_distance(vgg, output: Tensor, content: Tensor, layer: str = CONTENT_LAYER) -> float:
    """||F(output) - F(content)|| / ||F(content)|| on ``layer``; ``content`` at the output's shape."""
    with torch.no_grad():
        a, b = vgg(output, [layer])[layer].double(), vgg(content, [layer])[layer].double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def palette_distance(output: Tensor, style: Tensor, size: int = PALETTE_SIZE) -> float:
    """Sliced W2 between the RGB pixels of ``output`` and ``style`` (each (1, 3, H, W) in 0..1), both resized to
    ``size`` px on the long side first."""

    def pixels(image: Tensor) -> Tensor:
        image = resize(image.float(), fit_longest(image.shape[-2], image.shape[-1], size))
        return image[0].reshape(3, -1).T

    return sliced_wasserstein(pixels(output), pixels(style))


def best_patch_cosine(output: Tensor, style: Tensor, size: int = 3) -> Tensor:
    """For every size x size patch of the (1, C, H, W) map ``output``, the cosine similarity of the most similar
    patch of ``style`` (stride 1, exhaustive, chunked search): shape (N_output,), float64."""
    index = nearest_patches(output, style, size, 1)  # maximises <q, s> / |s|, hence the cosine for each q
    chosen = _gather_patches(positions_last(style.double()), tuple(style.shape[-2:]), index, size, 1)
    query = patches(output.double(), size, 1)
    return (query * chosen).sum(1) / (query.norm(dim=1) * chosen.norm(dim=1)).clamp_min(1e-12)


def patch_distance(vgg, output: Tensor, style: Tensor, layers: tuple[str, ...] = PATCH_LAYERS) -> dict[str, float]:
    """1 - mean best-patch cosine per layer, and their mean under "mean". ``style`` as for ``style_distance``."""
    with torch.no_grad():
        out_f, style_f = vgg(output, layers), vgg(style, layers)
    distances = {layer: 1.0 - float(best_patch_cosine(out_f[layer], style_f[layer]).mean()) for layer in layers}
    distances["mean"] = sum(distances[layer] for layer in layers) / len(layers)
    return distances


MOTIF_LAYER = "relu3_1"
TILE_LAYER = "relu4_2"
TILE_POSITIONS = 4  # relu4_2 positions per tile side: 32 px of the image


def motif_mask(shape: tuple[int, int], boxes: list[list[float]]) -> Tensor:
    """(H, W) bool: the positions of a map of ``shape`` inside any of ``boxes``, each [x0, y0, x1, y1] as fractions
    of the image's width and height (a position counts by its centre)."""
    h, w = shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    inside = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        inside |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return inside


def coherent_matches(index: Tensor, grid: tuple[int, int], style_cols: int) -> Tensor:
    """(rows, cols) bool over a grid of query patches whose nearest style patches are ``index`` (row-major over a
    style grid ``style_cols`` wide): whether at least half of a patch's 4 neighbours matched the style patch
    next to its own match in the same direction, within one position either way."""
    rows, cols = grid
    match_row, match_col = (index // style_cols).view(rows, cols), (index % style_cols).view(rows, cols)
    agree = torch.zeros(rows, cols)
    count = torch.zeros(rows, cols)
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        here = (slice(max(0, -dy), rows - max(0, dy)), slice(max(0, -dx), cols - max(0, dx)))
        there = (slice(max(0, dy), rows - max(0, -dy)), slice(max(0, dx), cols - max(0, -dx)))
        same_row = (match_row[there] - match_row[here] - dy).abs() <= 1
        same_col = (match_col[there] - match_col[here] - dx).abs() <= 1
        agree[here] += (same_row & same_col).float()
        count[here] += 1
    return agree >= count / 2


def motif_copies_of_maps(
    output: Tensor, style: Tensor, motif: Tensor, content: Tensor | None = None, size: int = 3
) -> Tensor:
    """(rows, cols) bool over ``output``'s size x size patches (a (1, C, H, W) map): those whose nearest patch of
    ``style`` (by <q, s> / |s|, exhaustive) has its centre position in ``motif`` ((H_s, W_s) bool, the style map's
    positions) and whose neighbours' matches cohere with it (``coherent_matches``); with ``content`` (the content
    image's map, as ``output``), only where the content's own nearest style patch is not in the motif: copies the
    photo does not call for (an eye matched to an eye of the photo, or to a lit railing that looks like a lid, is
    the method doing its job)."""

    def in_motif(query: Tensor) -> tuple[Tensor, Tensor]:
        index = nearest_patches(query, style, size, 1).cpu()
        return motif.cpu()[index // style_cols + size // 2, index % style_cols + size // 2].view(grid), index

    grid = (output.shape[-2] - size + 1, output.shape[-1] - size + 1)
    style_cols = style.shape[-1] - size + 1
    found, index = in_motif(output)
    copies = found & coherent_matches(index, grid, style_cols)
    return copies if content is None else copies & ~in_motif(content)[0]


def motif_share_of_maps(
    output: Tensor, style: Tensor, motif: Tensor, content: Tensor | None = None, size: int = 3
) -> float:
    """The share of ``output``'s patches that ``motif_copies_of_maps`` finds."""
    return float(motif_copies_of_maps(output, style, motif, content, size).double().mean())


def motif_copies(
    vgg, output: Tensor, style: Tensor, boxes: list[list[float]], content: Tensor, layer: str = MOTIF_LAYER
) -> Tensor:
    """``motif_copies_of_maps`` on ``layer``, ``style`` resized to the output's longest side and ``content`` to the
    output's shape here. Patch (i, j) of relu3_1 is centred on the image's pixels around ((i, j) + 1) * 4."""
    style = resize(style.to(output.device), fit_longest(style.shape[-2], style.shape[-1], max(output.shape[-2:])))
    content = resize(content.to(output.device), tuple(output.shape[-2:]))
    with torch.no_grad():
        maps = [vgg(image, [layer])[layer].float() for image in (output, style, content)]
    return motif_copies_of_maps(maps[0], maps[1], motif_mask(tuple(maps[1].shape[-2:]), boxes), maps[2])


def motif_share(
    vgg, output: Tensor, style: Tensor, boxes: list[list[float]], content: Tensor, layer: str = MOTIF_LAYER
) -> float:
    """The share of ``output``'s patches that ``motif_copies`` finds."""
    return float(motif_copies(vgg, output, style, boxes, content, layer).double().mean())


def tile_distances(output: Tensor, content: Tensor, positions: int = TILE_POSITIONS) -> Tensor:
    """(rows, cols): the squared distance between two (1, C, H, W) maps summed over each ``positions`` square tile
    (the last row and column of tiles may be smaller), over the mean of the whole tiles' sums."""
    square = (output.double() - content.double()).square().sum(1, keepdim=True)
    sums = F.avg_pool2d(square, positions, ceil_mode=True, divisor_override=1)[0, 0]
    whole = sums[: square.shape[-2] // positions, : square.shape[-1] // positions]
    return sums / whole.mean().clamp_min(1e-30)


def local_content_distance(vgg, output: Tensor, content: Tensor, layer: str = TILE_LAYER) -> Tensor:
    """``tile_distances`` of relu4_2; ``content`` is resized to the output's shape here. Tile (i, j) covers the
    image's pixels from (i, j) * 32 (8x the positions of relu4_2, after three poolings)."""
    content = resize(content.to(output.device), tuple(output.shape[-2:]))
    with torch.no_grad():
        a, b = vgg(output, [layer])[layer], vgg(content, [layer])[layer]
    return tile_distances(a, b)


def evaluate(vgg, output: Tensor, content: Tensor, style: Tensor) -> dict[str, float | dict[str, float]]:
    """All measures of one output. ``content`` and ``style`` are resized here: the content to the output's
    shape, the style to the output's longest side (the scale ``stylize`` uses at its last level)."""
    shape = tuple(output.shape[-2:])
    palette = palette_distance(output, style.to(output.device))
    content = resize(content.to(output.device), shape)
    style = resize(style.to(output.device), fit_longest(style.shape[-2], style.shape[-1], max(shape)))
    swd = style_distance(vgg, output, style)
    patch = patch_distance(vgg, output, style)
    return {
        "style_swd": swd["mean"],
        "style_swd_layers": {k: v for k, v in swd.items() if k != "mean"},
        "patch_dist": patch["mean"],
        "patch_dist_layers": {k: v for k, v in patch.items() if k != "mean"},
        "content_dist": content_distance(vgg, output, content),
        "ssim": ssim(luminance(output), luminance(content)),
        "palette_dist": palette,
    }


__all__ = [
    "CONTENT_LAYER",
    "PATCH_LAYERS",
    "STYLE_LAYERS",
    "best_patch_cosine",
    "coherent_matches",
    "content_distance",
    "evaluate",
    "feature_points",
    "gaussian_window",
    "local_content_distance",
    "luminance",
    "motif_copies",
    "motif_copies_of_maps",
    "motif_mask",
    "motif_share",
    "motif_share_of_maps",
    "palette_distance",
    "patch_distance",
    "projections",
    "sliced_wasserstein",
    "ssim",
    "style_distance",
    "tile_distances",
]
