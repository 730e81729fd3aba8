"""Shared test helpers: tiny seeded networks and images, so the loss logic runs in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch

from fusion_core import random_vgg

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRAINED_VGG16 = SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"
IMAGES = SHARED / "images"


def tiny_vgg(arch: str = "vgg19", width: int = 4, **kwargs):
    return random_vgg(arch, width=width, seed=0, **kwargs)


def smooth_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A random but smooth RGB image (1, 3, H, W) in 0..1: more image-like than white noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 4), max(2, width // 4), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
