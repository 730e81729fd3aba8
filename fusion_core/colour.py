"""Keeping the content's colours (Gatys et al. 2017, "Controlling perceptual factors", section 5).

- ``luminance``: transfer style on luminance only: content and style become grey (their Y channel,
  the style's Y matched to the content's mean and spread), and the output's Y is recombined with the
  content's chroma (I, Q of YIQ).
- ``histogram``: recolour each style image so its colour mean and covariance equal the content's,
  then stylise as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor

COLOR_MODES = ("none", "luminance", "histogram")

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


def _colour_statistics(image: Tensor) -> tuple[Tensor, Tensor]:
    pixels = image[0].reshape(3, -1).double()
    mean = pixels.mean(1, keepdim=True)
    centred = pixels - mean
    return mean, centred @ centred.T / pixels.shape[1]


def _sqrt_and_inverse_sqrt(covariance: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp_min(1e-10)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def match_histogram(style: Tensor, content: Tensor) -> Tensor:
    """Affine recolouring x -> A (x - mu_s) + mu_c with A = C_c^1/2 C_s^-1/2: the style then has the
    content's colour mean and covariance exactly (values may leave 0..1; the network does not mind)."""
    mean_s, cov_s = _colour_statistics(style)
    mean_c, cov_c = _colour_statistics(content)
    sqrt_c, _ = _sqrt_and_inverse_sqrt(cov_c)
    _, inv_sqrt_s = _sqrt_and_inverse_sqrt(cov_s)
    transform = sqrt_c @ inv_sqrt_s
    pixels = style[0].reshape(3, -1).double()
    matched = transform @ (pixels - mean_s) + mean_c
    return matched.reshape_as(style[0])[None].to(style.dtype)
