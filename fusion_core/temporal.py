"""Temporal consistency between frames (Ruder, Dosovitskiy and Brox 2016, "Artistic style transfer for videos").

A frame after the first starts from the previous *stylised* frame warped into it along the optical flow, and a
short-term temporal term keeps it there where the flow can be trusted:

    L_temporal(x) = (1 / D) * sum c * (x - warp(x_prev))^2      (D: the image's values, RGB in 0..1)

with a reliability mask c that is 0 where the forward-backward check finds a disocclusion, where the point was
outside the previous frame, or where the flow has a motion boundary, and 1 elsewhere (``reliability``). Flows are in
pixels, (1, 2, H, W): channel 0 the horizontal displacement, channel 1 the vertical one; the *backward* flow of
frame t gives, for each of its pixels, where that point was in frame t-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import FusionError

# The forward-backward check's tolerances (Ruder et al., after Sundaram et al. 2010): a pixel is occluded where
# |w_b + w_f(x + w_b)|^2 > OCCLUSION_SLOPE * (|w_b|^2 + |w_f(x + w_b)|^2) + OCCLUSION_FLOOR, and on a motion
# boundary where |grad u_b|^2 + |grad v_b|^2 > BOUNDARY_SLOPE * |w_b|^2 + BOUNDARY_FLOOR.
OCCLUSION_SLOPE, OCCLUSION_FLOOR = 0.01, 0.5
BOUNDARY_SLOPE, BOUNDARY_FLOOR = 0.01, 0.002


def _sample_points(image: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
    """Where each pixel of ``image`` is sampled from: x + ``flow``(x), as the column and row coordinates, in pixels
    (after checking ``flow`` against the image's size)."""
    _check_flow("flow", flow, image.shape[-2:])
    h, w = image.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=image.dtype),
        torch.arange(w, device=image.device, dtype=image.dtype),
        indexing="ij",
    )
    return xs + flow[:, 0].to(image.dtype), ys + flow[:, 1].to(image.dtype)


def warp(image: Tensor, flow: Tensor) -> Tensor:
    """``image`` (B, C, H, W) sampled at x + ``flow``(x) for every pixel x (bilinear; outside the image, its
    border): the previous frame moved into the current one when ``flow`` is the current frame's backward flow."""
    b, _, h, w = image.shape
    x, y = _sample_points(image, flow)
    # normalised to -1..1 at the outer pixels' centres (align_corners=True)
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1).expand(b, h, w, 2)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


# The cubic B-spline's prefilter, the inverse of its samples (1, 4, 1) / 6, is sqrt(3) z^|k| with z = sqrt(3) - 2
# (Unser, Aldroubi and Eden 1991); cut at |k| = SPLINE_TAPS, where |z|^k < 3e-5.
SPLINE_POLE = math.sqrt(3) - 2
SPLINE_TAPS = 8


def _spline_coefficients(image: Tensor) -> Tensor:
    """The cubic B-spline coefficients that interpolate ``image`` (B, C, H, W) at its pixels: the prefilter as one
    separable FIR convolution on the mirrored image (the sequence's mirror extension, as the taps read it)."""
    channels = image.shape[1]
    for axis in (-1, -2):
        taps = min(SPLINE_TAPS, image.shape[axis] - 1)
        if taps == 0:
            continue
        # made on the host in Python floats: a negative base's powers on every backend
        weights = [math.sqrt(3) * SPLINE_POLE ** abs(k) for k in range(-taps, taps + 1)]
        kernel = torch.tensor([w / sum(weights) for w in weights], dtype=image.dtype).to(image.device)
        kernel = kernel.view(1, 1, 1, -1) if axis == -1 else kernel.view(1, 1, -1, 1)
        pad = (taps, taps, 0, 0) if axis == -1 else (0, 0, taps, taps)
        image = F.conv2d(
            F.pad(image, pad, mode="reflect"), kernel.expand(channels, 1, *kernel.shape[-2:]), groups=channels
        )
    return image


def _mirror(index: Tensor, size: int) -> Tensor:
    """Indices outside 0..size-1 reflected back into it (-1 -> 1, size -> size - 2)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index > size - 1, period - index, index)


def _spline_weights(t: Tensor) -> list[Tensor]:
    """The cubic B-spline's weights of the four taps at offsets -1, 0, 1, 2 from floor(x), for x's fraction ``t``."""
    s = 1 - t
    return [s**3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (3 * s**3 - 6 * s**2 + 4) / 6, t**3 / 6]


def warp_spline(image: Tensor, flow: Tensor) -> Tensor:
    """``warp`` with cubic B-spline interpolation, for a picture moved frame after frame (a clip's later frames
    start from the one before, warped; outside the image, its border).

    A chain of warps applies the interpolator's frequency response once per frame, so any gain above 1 grows
    without bound and any loss adds up: bilinear sampling blurs (sixty warps of a 0.7 px pan, out and back, kept a
    quarter of a stylised frame's gradient), and cubic convolution with torch's a = -0.75 amplifies the middle
    frequencies (the same chain: 2.6 times the gradient, ringing along the motion). The B-spline interpolant
    (Unser et al. 1991: a prefilter, then the B-spline's non-negative weights) passes through the pixels, loses
    least of the interpolators measured and never amplifies (0.6 of the gradient, a fifth of the bilinear chain's
    squared error). Convolution, padding and gathers of the 16 taps: every backend has them."""
    b, c, h, w = image.shape
    x, y = _sample_points(image, flow)
    x, y = x.clamp(0, w - 1), y.clamp(0, h - 1)  # outside: the border's value, as ``warp`` gives
    x0, y0 = x.floor(), y.floor()
    wx, wy = _spline_weights(x - x0), _spline_weights(y - y0)
    x0, y0 = x0.long(), y0.long()
    flat = _spline_coefficients(image).reshape(b, c, h * w)
    out = torch.zeros_like(image)
    for i, weight_y in enumerate(wy):
        row = _mirror(y0 + (i - 1), h) * w
        for j, weight_x in enumerate(wx):
            index = (row + _mirror(x0 + (j - 1), w)).reshape(-1, 1, h * w).expand(b, c, h * w)
            out += (weight_y * weight_x)[:, None] * flat.gather(2, index).view(b, c, h, w)
    return out


def reliability(backward: Tensor, forward: Tensor) -> Tensor:
    """The mask c (1, 1, H, W) of frame t: 0 where frame t-1 does not show the pixel (a disocclusion, by the
    forward-backward check, or a point that was outside frame t-1: what a pan brings in at the edge) or where the
    backward flow has a motion boundary, 1 elsewhere. ``backward``: frame t's flow to t-1; ``forward``: frame t-1's
    flow to t."""
    _check_flow("backward", backward, backward.shape[-2:])
    _check_flow("forward", forward, backward.shape[-2:])
    back = backward.float()
    ahead = warp(forward.float(), back)  # w_f at x + w_b(x)
    round_trip = (back + ahead).square().sum(1, keepdim=True)
    lengths = back.square().sum(1, keepdim=True) + ahead.square().sum(1, keepdim=True)
    occluded = round_trip > OCCLUSION_SLOPE * lengths + OCCLUSION_FLOOR
    boundary = _gradient_energy(back) > BOUNDARY_SLOPE * back.square().sum(1, keepdim=True) + BOUNDARY_FLOOR
    # The forward-backward check cannot see these: the warp reads the border there, so the round trip closes. Held to
    # that border, the strip a pan brings in would stay a streak, carried on frame after frame.
    h, w = back.shape[-2:]
    x, y = _sample_points(back, back)
    outside = ((x < 0) | (x > w - 1) | (y < 0) | (y > h - 1))[:, None]
    return (~(occluded | boundary | outside)).float()


def temporal_loss(image: Tensor, warped: Tensor, mask: Tensor) -> Tensor:
    """The short-term temporal term: the mean over ``image``'s values of ``mask`` * (image - warped)^2."""
    return (mask * (image - warped).square()).sum() / image.numel()


def temporal_gradient(image: Tensor, warped: Tensor, mask: Tensor) -> Tensor:
    """``temporal_loss``'s gradient with respect to ``image``."""
    return 2 * mask * (image - warped) / image.numel()


class TemporalTerm:
    """weight * ``temporal_loss`` of the output against the previous stylised frame warped into this one, for
    ``stylize(..., pixel_term=)``: evaluated on the output's own pixels (a level's canvas without its margin)."""

    def __init__(self, warped: Tensor, mask: Tensor, weight: float) -> None:
        if weight < 0:
            raise FusionError(f"temporal_weight: expected a number >= 0, got {weight}")
        self.warped, self.mask, self.weight = warped, mask, float(weight)

    def add_to(self, image: Tensor, grad: Tensor) -> Tensor:
        """Adds the term's gradient at ``image`` (1, 3, H, W) to ``grad`` and returns its weighted value."""
        shape = tuple(image.shape[-2:])
        warped, mask = self._at(self.warped, shape), self._at(self.mask, shape)
        grad += self.weight * temporal_gradient(image, warped, mask)
        return self.weight * temporal_loss(image, warped, mask)

    def _at(self, tensor: Tensor, shape: tuple[int, int]) -> Tensor:
        if tuple(tensor.shape[-2:]) != shape:  # an earlier, smaller pyramid level
            tensor = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)
        return tensor


def _gradient_energy(flow: Tensor) -> Tensor:
    """|grad u|^2 + |grad v|^2 per pixel, by central differences (one-sided at the border)."""
    padded = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    dy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return (dx.square() + dy.square()).sum(1, keepdim=True)


def _check_flow(name: str, flow: Tensor, shape: torch.Size | tuple[int, int]) -> None:
    if flow.dim() != 4 or flow.shape[1] != 2 or tuple(flow.shape[-2:]) != tuple(shape):
        raise FusionError(
            f"{name}: expected a flow of shape (B, 2, {shape[0]}, {shape[1]}) in pixels, got {tuple(flow.shape)}"
        )
