"""Load VGG: the feature network every loss is measured with."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from ..fusion_core.errors import FusionError
from ..fusion_core.vgg import CONVENTIONS, POOLINGS, VGGFeatures
from ..fusion_core.weights import find_weights, load_vgg
from . import comfy
from .common import CATEGORY, PACK_ALIASES

OFFICIAL = "vgg19"  # torchvision's ImageNet VGG19, downloaded into models/vgg on first use
CACHE_SIZE = 2  # loaded networks kept across runs (VGG19 features: 80 MB each)

_cache: OrderedDict[tuple, VGGFeatures] = OrderedDict()


def resolve_weights(weights: str, *, download: bool = True) -> str:
    """The file behind a choice of the weights list; ``vgg19`` is looked up, or downloaded, in the vgg folders."""
    if weights == OFFICIAL:
        progress = comfy.download_progress() if download else None
        return str(find_weights(OFFICIAL, comfy.models_dirs(), download=download, progress=progress))
    path = comfy.weights_path(weights)
    if path is None:
        raise FusionError(
            f"weights: {weights!r} is not in the vgg model folder ({', '.join(comfy.models_dirs())}); "
            f"put a VGG16/VGG19 .safetensors or .pth file there and refresh, or choose {OFFICIAL!r}"
        )
    return path


def load_cached(weights: str, convention: str, pooling: str) -> VGGFeatures:
    """Load the network once; later runs with the same file (unchanged on disk) and options reuse it."""
    path = resolve_weights(weights)
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, convention, pooling)
    if key not in _cache:
        # ComfyUI runs nodes under inference_mode; the network must hold ordinary tensors for autograd.
        with torch.inference_mode(False):
            _cache[key] = load_vgg(path, convention=convention, pooling=pooling)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return _cache[key]


class FusionStyleLoadVGG:
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads a VGG16/VGG19 feature network from models/vgg, or the official ImageNet VGG19 (downloaded into "
        "models/vgg on first use). The style and content losses are measured in its features."
    )
    RETURN_TYPES = ("VGG_MODEL",)
    RETURN_NAMES = ("vgg",)
    OUTPUT_TOOLTIPS = ("The VGG feature network, for Fused Style Optimize.",)
    FUNCTION = "load"
    SEARCH_ALIASES = [*PACK_ALIASES, "VGG16", "VGG19", "load model"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "weights": (
                    [OFFICIAL, *comfy.weights_files()],
                    {
                        "default": OFFICIAL,
                        "tooltip": "A VGG16/VGG19 weights file (.safetensors, .pth) in models/vgg, or 'vgg19': the "
                        "official ImageNet VGG19, downloaded into models/vgg on first use (548 MB, SHA-256 checked).",
                    },
                ),
                "convention": (
                    ["auto", *CONVENTIONS],
                    {
                        "default": "auto",
                        "tooltip": "How the weights expect their input: 'torchvision' (RGB, ImageNet mean/std) or "
                        "'caffe' (BGR 0..255 minus mean). 'auto' reads the file's metadata, else torchvision.",
                    },
                ),
                "pooling": (
                    list(POOLINGS),
                    {
                        "default": "max",
                        "tooltip": "Pooling between the VGG blocks: 'max' as trained; 'avg' gives smoother results "
                        "(Gatys et al.).",
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, weights, convention, pooling):
        # Run again when the chosen file is replaced on disk (same name, new content).
        try:
            stat = os.stat(resolve_weights(weights, download=False))
        except (FusionError, OSError):
            return "missing"
        return f"{stat.st_mtime_ns}:{stat.st_size}"

    def load(self, weights, convention, pooling):
        return (load_cached(weights, convention, pooling),)
