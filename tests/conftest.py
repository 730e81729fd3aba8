"""Shared fixtures: tiny seeded networks and smooth images for the library tests; the node pack, ComfyUI IMAGE
tensors and ComfyUI's services faked for the node tests.

The node pack is imported as ``fusion_style`` before any test module, the way ComfyUI loads a custom node folder
(helpers.load_pack), so test modules can ``import fusion_style``.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from helpers import comfy_images, load_pack, loss_chain, smooth_image, tiny_vgg

from fusion_core import precision

load_pack()


@pytest.fixture(autouse=True)
def float32_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests compare against float32 computations, on whatever CPU runs them: the bfloat16 path that CPUs with
    bfloat16 instructions take by default is switched on only by the tests written for it (in the library and
    in the node pack's copy of it)."""
    for module in (precision, importlib.import_module("fusion_style.fusion_core.precision")):
        monkeypatch.setattr(module, "native_bfloat16", lambda: False)


# --- the library: fusion_core's (1, 3, H, W) images --------------------------------------------------------


@pytest.fixture(scope="module")
def vgg():
    """A VGG19 with seeded random weights, 4 channels wide in its first block."""
    return tiny_vgg("vgg19", width=4)


@pytest.fixture
def content() -> torch.Tensor:
    """A smooth 48x64 image (landscape, unlike the styles)."""
    return smooth_image(48, 64, seed=11)


@pytest.fixture
def style() -> torch.Tensor:
    return smooth_image(56, 56, seed=12)


@pytest.fixture
def other_style() -> torch.Tensor:
    return smooth_image(56, 56, seed=13)


# --- the nodes: the pack's own fusion_core, ComfyUI IMAGEs (B, H, W, C) -----------------------------------


@pytest.fixture
def node_vgg():
    """What Load VGG would give: a VGG19 of the pack's own class (seeded random weights, 4 channels wide)."""
    return load_pack().fusion_core.random_vgg(width=4)


@pytest.fixture
def content_image() -> torch.Tensor:
    """A 32x32 ComfyUI IMAGE (1, 32, 32, 3), made in inference mode."""
    return comfy_images(1, 32, 32)


@pytest.fixture
def style_image() -> torch.Tensor:
    """A 40x32 ComfyUI IMAGE (1, 40, 32, 3), made in inference mode."""
    return comfy_images(1, 40, 32, seed=1)


@pytest.fixture
def style_terms(style_image) -> list:
    """The STYLE_LOSSES of a Global Style Loss chained into a Local Patch Loss on ``style_image``."""
    return loss_chain(style_image)


@pytest.fixture
def fake_stylize(monkeypatch):
    """``install(module)`` replaces ``module.stylize`` with a stand-in that records the Settings it is given and
    returns the content as it is, and returns the list of recorded Settings (its ``styles``: the terms of each
    call): what a front end (the CLI, a node) hands fusion_core, without the optimisation."""

    class Calls(list):
        styles: list

    def install(module) -> list:
        calls = Calls()
        calls.styles = []

        def record(vgg, content, styles, settings, **kwargs):
            calls.append(settings)
            calls.styles.append(list(styles))
            return content

        monkeypatch.setattr(module, "stylize", record)
        return calls

    return install


@pytest.fixture
def fresh_loader_cache(monkeypatch) -> None:
    """Load VGG's cache of loaded networks, emptied for this test."""
    loader = importlib.import_module("fusion_style.nodes.loader")
    monkeypatch.setattr(loader, "_cache", type(loader._cache)())


@pytest.fixture
def models_dir(tmp_path, monkeypatch, fresh_loader_cache) -> Path:
    """An empty models/vgg folder, where Load VGG looks when ComfyUI's folder_paths is absent."""
    folder = tmp_path / "vgg"
    folder.mkdir()
    monkeypatch.setattr(importlib.import_module("fusion_style.nodes.comfy"), "fallback_models_dir", folder)
    return folder


class FakeComfyUI:
    """The parts of ComfyUI the pack uses, recording what it is asked to do."""

    def __init__(self, base: Path) -> None:
        self.interrupted = False
        self.interrupt_at: int | None = None  # progress value at which the user "cancels"
        self.updates: list[tuple] = []
        self.calls: list[str] = []
        fake = self

        mm = types.ModuleType("comfy.model_management")
        mm.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: fake.calls.append("offload") or torch.device("cpu")
        mm.free_memory = lambda num_bytes, device: fake.calls.append("free_memory")
        mm.soft_empty_cache = lambda: fake.calls.append("soft_empty_cache")
        mm.processing_interrupted = lambda: fake.interrupted

        def throw_exception_if_processing_interrupted():
            if fake.interrupted:
                fake.interrupted = False
                raise mm.InterruptProcessingException()

        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

        class ProgressBar:
            def __init__(self, total):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.updates.append((value, total, preview))
                if value == fake.interrupt_at:
                    fake.interrupted = True

        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = ProgressBar
        cli_args = types.ModuleType("comfy.cli_args")
        cli_args.args = types.SimpleNamespace(preview_size=256)
        package = types.ModuleType("comfy")
        package.model_management, package.utils, package.cli_args = mm, utils, cli_args

        fp = types.ModuleType("folder_paths")  # the semantics of ComfyUI's folder_paths, in brief
        fp.models_dir = str(base / "models")
        fp.folder_names_and_paths = {}

        def add_model_folder_path(name, path, is_default=False):
            if name not in fp.folder_names_and_paths:
                fp.folder_names_and_paths[name] = ([path], set())
            elif path not in fp.folder_names_and_paths[name][0]:
                paths = fp.folder_names_and_paths[name][0]
                paths.insert(0, path) if is_default else paths.append(path)

        def get_filename_list(name):
            paths, extensions = fp.folder_names_and_paths[name]
            found = {f.name for p in paths if os.path.isdir(p) for f in Path(p).iterdir() if f.is_file()}
            return sorted(f for f in found if not extensions or os.path.splitext(f)[1] in extensions)

        def get_full_path(name, filename):
            paths = [os.path.join(p, filename) for p in fp.folder_names_and_paths[name][0]]
            return next((p for p in paths if os.path.isfile(p)), None)

        fp.add_model_folder_path = add_model_folder_path
        fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
        fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
        self.mm, self.folder_paths = mm, fp
        self.modules = {
            "comfy": package,
            "comfy.model_management": mm,
            "comfy.utils": utils,
            "comfy.cli_args": cli_args,
            "folder_paths": fp,
        }


@pytest.fixture
def comfyui(tmp_path, fresh_loader_cache):
    """ComfyUI's modules faked in sys.modules for the test (ComfyUI's own tests fake them the same way)."""
    fake = FakeComfyUI(tmp_path)
    with patch.dict(sys.modules, fake.modules):
        yield fake
