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


# Keys' cubic convolution kernel's parameter, as torch's bicubic interpolation has it
CUBIC_A = -0.75


def _cubic_weights(t: Tensor) -> list[Tensor]:
    """The weights of the four taps at offsets -1, 0, 1, 2 from floor(x), for the fractional part ``t`` of x."""
    a = CUBIC_A

    def near(d: Tensor) -> Tensor:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def warp_sharp(image: Tensor, flow: Tensor) -> Tensor:
    """``warp`` with cubic interpolation (Keys, a = -0.75; outside the image, its border), for a picture moved
    frame after frame: bilinear sampling at a fractional offset is a small blur, and the blurs of a chain of warps
    add up (a stylised frame carried over 19 frames of a slow pan along its exact flow kept 0.29 of its gradient
    energy bilinearly, all of it cubically). Gathers of the 16 taps, which every backend has; equal to
    ``F.grid_sample(mode="bicubic", padding_mode="border", align_corners=True)``, which not every backend has."""
    b, c, h, w = image.shape
    x, y = _sample_points(image, flow)
    x0, y0 = x.floor(), y.floor()  # each tap, not the point, is clamped to the image (as torch's bicubic does)
    wx, wy = _cubic_weights(x - x0), _cubic_weights(y - y0)
    x0, y0 = x0.long(), y0.long()
    flat = image.reshape(b, c, h * w)
    out = torch.zeros_like(image)
    for i, weight_y in enumerate(wy):
        row = (y0 + (i - 1)).clamp(0, h - 1) * w
        for j, weight_x in enumerate(wx):
            index = (row + (x0 + (j - 1)).clamp(0, w - 1)).reshape(-1, 1, h * w).expand(b, c, h * w)
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
