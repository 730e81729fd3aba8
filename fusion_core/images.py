"""Image tensors in and out: validation, resizing, files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import FusionError

SAVE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_image(name: str, image: Tensor) -> Tensor:
    """Return ``image`` as float32 (1, 3, H, W) or raise a FusionError naming ``name``."""
    if not isinstance(image, Tensor):
        raise FusionError(f"{name}: expected a tensor (1, 3, H, W) in 0..1, got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise FusionError(f"{name}: expected one RGB image of shape (1, 3, H, W), got shape {tuple(image.shape)}")
    if image.shape[-1] < 1 or image.shape[-2] < 1:
        raise FusionError(f"{name}: the image is empty ({image.shape[-2]}x{image.shape[-1]} pixels)")
    if not image.is_floating_point():
        raise FusionError(f"{name}: expected a float tensor in 0..1, got {image.dtype}")
    if not torch.isfinite(image).all():
        raise FusionError(f"{name}: the image contains NaN or infinite values")
    return image.float().contiguous()


def check_mask(name: str, mask: Tensor) -> Tensor:
    """Return ``mask`` as float32 (H, W) clamped to 0..1, or raise a FusionError naming ``name``."""
    if not isinstance(mask, Tensor):
        raise FusionError(f"{name}: expected a tensor (H, W) in 0..1, got {type(mask).__name__}")
    while mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or min(mask.shape) < 1:
        raise FusionError(f"{name}: expected one mask of shape (H, W), got shape {tuple(mask.shape)}")
    mask = mask.float()
    if not torch.isfinite(mask).all():
        raise FusionError(f"{name}: the mask contains NaN or infinite values")
    mask = mask.clamp(0, 1)
    if not mask.any():
        raise FusionError(f"{name}: the mask is empty (all zero), so its style would apply nowhere; mark a region > 0")
    return mask


def resize(image: Tensor, shape: tuple[int, int]) -> Tensor:
    """Resize (B, C, H, W) to ``shape`` (antialiased when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(shape):
        return image
    return F.interpolate(image, size=shape, mode="bilinear", align_corners=False, antialias=True)


def resize_mask(mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """Resize an (H, W) mask to ``shape`` by area averaging, so soft edges stay soft."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    return F.interpolate(mask[None, None], size=shape, mode="bilinear", antialias=True, align_corners=False)[
        0, 0
    ].clamp(0, 1)


def mirror_pad(image: Tensor, margin: int) -> Tensor:
    """``image`` with a ``margin`` px border mirrored from its edges (repeated where the image is narrower)."""
    if margin == 0:
        return image
    mode = "reflect" if min(image.shape[-2:]) > margin else "replicate"
    return F.pad(image, (margin,) * 4, mode=mode)


def load_image(path: str | os.PathLike, name: str = "image") -> Tensor:
    """Read an image file as (1, 3, H, W) RGB in 0..1 (greyscale and alpha are converted to RGB)."""
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"{name}: file not found: {path}")
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise FusionError(f"{name}: {path.name} is not a readable image ({error})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]


def to_pil(image: Tensor) -> Image.Image:
    array = (image.detach()[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path we could not write, before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in SAVE_SUFFIXES:
        raise FusionError(f"out: unsupported image extension {path.suffix!r}; use one of {', '.join(SAVE_SUFFIXES)}")
    if not path.parent.is_dir():
        raise FusionError(f"out: folder does not exist: {path.parent}")
    return path


def save_image(image: Tensor, path: str | os.PathLike) -> None:
    """Write (1, 3, H, W) to ``path`` atomically (a temporary file renamed into place)."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        to_pil(image).save(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
