"""ComfyUI's IMAGE and MASK tensors to fusion_core's and back.

ComfyUI: IMAGE is (B, H, W, C) float in 0..1, MASK is (B, H, W) or (H, W).
fusion_core: an image is (1, 3, H, W) RGB in 0..1, a mask is (H, W).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..fusion_core.errors import FusionError


def split_images(name: str, images: Tensor) -> list[Tensor]:
    """A ComfyUI IMAGE batch as a list of fusion_core RGB images.

    An alpha channel is dropped; a single-channel (grey) image is repeated to RGB.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise FusionError(
            f"{name}: expected a ComfyUI IMAGE of shape (batch, height, width, 3) (1 or 4 channels are converted), "
            f"got {shape}"
        )
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    # contiguous: fusion_core would otherwise optimise a channels-last view (L-BFGS needs a flat gradient)
    return [image[None, ..., :3].movedim(-1, 1).contiguous() for image in images]


def join_images(images: list[Tensor]) -> Tensor:
    """fusion_core images of one size as a ComfyUI IMAGE batch, on the CPU."""
    return torch.cat([image.movedim(1, -1) for image in images]).float().cpu()


def single_mask(name: str, mask: Tensor | None) -> Tensor | None:
    """A ComfyUI MASK as one (H, W) mask; a batch of several masks is refused rather than guessed at."""
    if mask is None:
        return None
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise FusionError(f"{name}: expected one mask, got a batch of {mask.shape[0]}; pass a single mask")
        mask = mask[0]
    if mask.ndim != 2:
        raise FusionError(f"{name}: expected a ComfyUI MASK of shape (height, width), got {tuple(mask.shape)}")
    return mask
