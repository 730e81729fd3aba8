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
    "content_distance",
    "evaluate",
    "feature_points",
    "gaussian_window",
    "luminance",
    "palette_distance",
    "patch_distance",
    "projections",
    "sliced_wasserstein",
    "ssim",
    "style_distance",
]
