"""Keeping the content's colours (Gatys et al. 2017, "Controlling perceptual factors", section 5).

- ``luminance``: transfer style on luminance only: content and style become grey (their Y channel,
  the style's Y matched to the content's mean and spread), and the output's Y is recombined with the
  content's chroma (I, Q of YIQ).
- ``histogram``: recolour each style image so its colour mean and covariance equal the content's,
  then stylise as usual.

The same colour map, the other way round, gives the default start of the optimisation: the content in the
style's colours (``stylize.starting_image``).
"""

from __future__ import annotations

import torch
from torch import Tensor

_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]], dtype=torch.float64
)


def rgb_to_yiq(image: Tensor) -> Tensor:
    matrix = _RGB_TO_YIQ.to(image.device, image.dtype)
    return torch.einsum("ij,bjhw->bihw", matrix, image)


def yiq_to_rgb(image: Tensor) -> Tensor:
    matrix = torch.linalg.inv(_RGB_TO_YIQ).to(image.device, image.dtype)
    return torch.einsum("ij,bjhw->bihw", matrix, image)


def grey(luma: Tensor) -> Tensor:
    """(1, 1, H, W) luminance as a 3-channel image, for the network."""
    return luma.expand(-1, 3, -1, -1).contiguous()


def luminance_only(style: Tensor, content: Tensor) -> Tensor:
    """The style's luminance, matched to the content luminance's mean and standard deviation, as grey RGB."""
    style_y, content_y = rgb_to_yiq(style)[:, :1], rgb_to_yiq(content)[:, :1]
    matched = (style_y - style_y.mean()) / style_y.std().clamp_min(1e-6) * content_y.std() + content_y.mean()
    return grey(matched)


def recombine_chroma(output: Tensor, content: Tensor) -> Tensor:
    """The output's luminance with the content's chroma (content resized to the output by the caller)."""
    yiq = rgb_to_yiq(content)
    yiq[:, :1] = rgb_to_yiq(output)[:, :1]
    return yiq_to_rgb(yiq).clamp(0, 1)


# Colour variances below this (a standard deviation of 0.01, 2.5 levels of 255) are treated as this: a nearly
# grey image's faint chroma noise is then not blown up into colour when it is mapped onto a colourful one.
_MIN_VARIANCE = 1e-4


def colour_statistics(image: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean (3, 1) and covariance (3, 3) of the pixels' RGB values, ``weight`` (H, W) weighing them.

    Summed on the image's device (in float32, or float64 for a float64 image: no float64 on GPUs), returned as
    small float64 tensors on the CPU, where the colour map's eigendecompositions run on every backend.
    """
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    pixels = image[0].reshape(3, -1).to(dtype)
    w = pixels.new_ones(pixels.shape[1]) if weight is None else weight.reshape(-1).to(pixels)
    w = w / w.sum().clamp_min(1e-12)
    mean = (pixels * w).sum(1, keepdim=True)
    centred = pixels - mean
    covariance = (centred * w) @ centred.T
    return mean.cpu().double(), covariance.cpu().double()


def _matrix_power(symmetric: Tensor, power: float, floor: float = 0.0) -> Tensor:
    values, vectors = torch.linalg.eigh(symmetric)
    return (vectors * values.clamp_min(floor) ** power) @ vectors.T


def colour_map(source: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(A, b) with x -> A x + b taking colours of mean/covariance ``source`` to ``target``'s mean and covariance.

    A is the linear Monge-Kantorovich map (Pitie & Kokaram 2007), the one of all such maps that moves colours the
    least: hues keep their order and neighbours, where other square roots of the covariances may swap them.
    A = S^-1/2 (S^1/2 T S^1/2)^1/2 S^-1/2 for source and target covariances S and T.
    """
    (mean_s, cov_s), (mean_t, cov_t) = source, target
    cov_s = _matrix_power(cov_s, 1.0, _MIN_VARIANCE)
    root_s, inverse_root_s = _matrix_power(cov_s, 0.5), _matrix_power(cov_s, -0.5)
    transform = inverse_root_s @ _matrix_power(root_s @ cov_t @ root_s, 0.5) @ inverse_root_s
    return transform, mean_t - transform @ mean_s


def apply_colour_map(image: Tensor, transform: Tensor, offset: Tensor) -> Tensor:
    """x -> transform x + offset on every pixel, in the image's dtype and on its device."""
    transform, offset = transform.to(image), offset.to(image)
    return (transform @ image[0].reshape(3, -1) + offset).reshape_as(image[0])[None]


def match_histogram(style: Tensor, content: Tensor) -> Tensor:
    """The style recoloured to the content's colour mean and covariance (values may leave 0..1; the network does
    not mind)."""
    return apply_colour_map(style, *colour_map(colour_statistics(style), colour_statistics(content)))


def recolour(content: Tensor, sources: list[tuple[Tensor, float, Tensor | None, Tensor | None]]) -> Tensor:
    """The content in the colours of the styles.

    ``sources``: (style image, weight, target mask, style mask) per style; a target mask (the content's size, 0..1)
    says where on the content the style applies, a style mask which part of the style image to take colours
    from. Each style's colour map is fitted between the content inside its target region and the style inside
    its style region. A pixel takes the styles' maps blended by weight x target mask, mixed with its own colour
    where the target masks cover it only partly or not at all. Returns (1, 3, H, W) in 0..1.
    """
    blend_weight = content.new_zeros(1, 1, *content.shape[-2:])
    coverage = torch.zeros_like(blend_weight)
    blended = torch.zeros_like(content)
    for style, weight, target_mask, style_mask in sources:
        region = content.new_ones(content.shape[-2:]) if target_mask is None else target_mask.to(content)
        if weight <= 0 or float(region.sum()) <= 0:
            continue
        transform, offset = colour_map(colour_statistics(content, region), colour_statistics(style, style_mask))
        blended = blended + weight * region * apply_colour_map(content, transform, offset)
        blend_weight = blend_weight + weight * region
        coverage = coverage + region
    coverage = coverage.clamp(0, 1)
    recoloured = blended / blend_weight.clamp_min(1e-12)
    return (coverage * recoloured + (1 - coverage) * content).clamp(0, 1)
