"""Shared test helpers: tiny seeded networks and images, so the loss logic runs in milliseconds, and the node pack
loaded and called as ComfyUI loads and calls it. Plain functions; the fixtures built on them are in conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fusion_core import random_vgg
from fusion_core.weights import save_safetensors_atomic, torchvision_conv_indices

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TRAINED_VGG16 = SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"
IMAGES = SHARED / "images"
# The trained network and the paintings of ../shared (the tests on real pictures skip where either is missing).
SHARED_DATA = pytest.mark.skipif(
    not (TRAINED_VGG16.is_file() and IMAGES.is_dir()), reason=f"no trained VGG16 and images in {SHARED}"
)
PACK = "fusion_style"  # the name the node pack is imported under in the tests


def tiny_vgg(arch: str = "vgg19", width: int = 4, **kwargs):
    return random_vgg(arch, width=width, seed=0, **kwargs)


def smooth_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A random but smooth RGB image (1, 3, H, W) in 0..1: more image-like than white noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 4), max(2, width // 4), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def write_tiny_vgg(path: Path, arch: str = "vgg16") -> Path:
    """``tiny_vgg(arch)`` saved with torchvision's key names, as a weights file in models/vgg would be."""
    vgg = tiny_vgg(arch)
    state = {}
    for index, conv in zip(torchvision_conv_indices(arch), vgg.convs, strict=True):
        state[f"features.{index}.weight"] = conv.weight.detach().clone()
        state[f"features.{index}.bias"] = conv.bias.detach().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(state, path, {"convention": "torchvision"})
    return path


# --- the node pack, as ComfyUI loads and runs it ---------------------------------------------------------


def load_pack() -> ModuleType:
    """The node pack, imported as ``fusion_style`` the way ComfyUI loads a custom node folder.

    ComfyUI imports ``custom_nodes/<folder>/__init__.py`` as a package (``spec_from_file_location``); the nodes
    reach fusion_core through relative imports inside that package, so ``fusion_style.fusion_core`` is a second
    copy of the library, with its own classes.
    """
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def call_node(name: str, **inputs):
    """Call node ``name``'s function: a fresh instance, keyword inputs."""
    node = load_pack().NODE_CLASS_MAPPINGS[name]()
    return getattr(node, node.FUNCTION)(**inputs)


def run_node(name: str, **inputs):
    """Call node ``name``'s function as ComfyUI does: under ``torch.inference_mode()``."""
    with torch.inference_mode():
        return call_node(name, **inputs)


def comfy_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, 3) of uniform noise, made in inference mode as ComfyUI's loaders make theirs."""
    with torch.inference_mode():
        return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def loss_chain(style_image: torch.Tensor, style_scale: float = 1.0, **extra) -> list:
    """A Global Style Loss (a1 = 20, three Gram layers) chained into a Local Patch Loss (a2 = 2.5e-5, relu3_1, 3x3
    patches) on ``style_image``, run as ComfyUI runs them. ``extra`` (mask, style_mask, blend) goes to both
    nodes; ``style_losses``, the chain to add the pair to, goes to the first."""
    previous = extra.pop("style_losses", None)
    (terms,) = run_node(
        "FusionStyleGlobalStyleLoss",
        style_image=style_image,
        weight=20.0,
        layers="relu1_2,relu2_2,relu3_3",
        style_scale=style_scale,
        style_losses=previous,
        **extra,
    )
    (terms,) = run_node(
        "FusionStyleLocalPatchLoss",
        style_image=style_image,
        weight=2.5e-5,  # the widget's default
        layer="relu3_1",
        patch_size=3,
        stride=1,
        style_scale=style_scale,
        style_losses=terms,
        **extra,
    )
    return terms


def saved_bytes(vgg, run) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass while ``run()`` records a pass through
    ``vgg``, the network's own weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in vgg.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())
