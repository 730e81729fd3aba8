"""The ComfyUI nodes, without ComfyUI: tiny seeded networks and images, run under torch.inference_mode() as
ComfyUI runs them. ComfyUI's services are faked in sys.modules where their use is what is tested."""

from __future__ import annotations

import ast
import inspect
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from unittest.mock import patch

import fusion_style
import pytest
import torch
from fusion_style.fusion_core import FusionError, GlobalStyle, LocalStyle, Settings, VGGFeatures, random_vgg
from fusion_style.fusion_core.config import INITS, PRESETS
from fusion_style.fusion_core.matching import MATCHERS
from fusion_style.fusion_core.stylize import OPTIMIZERS
from fusion_style.fusion_core.vgg import torchvision_conv_indices
from fusion_style.fusion_core.weights import save_safetensors_atomic
from fusion_style.nodes import comfy, loader, optimize
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NODES = fusion_style.NODE_CLASS_MAPPINGS
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
COMFYUI_MODULES = (
    "comfy",
    "comfy_extras",
    "comfy_api",
    "comfy_execution",
    "folder_paths",
    "server",
    "nodes",
    "execution",
    "latent_preview",
    "node_helpers",
)


def run(name: str, **inputs):
    """Call node ``name``'s function as ComfyUI does: a fresh instance, keyword inputs, inference mode."""
    node = NODES[name]()
    with torch.inference_mode():
        return getattr(node, node.FUNCTION)(**inputs)


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, 3), made in inference mode as ComfyUI's loaders make theirs."""
    with torch.inference_mode():
        return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def write_weights(path: Path, arch: str = "vgg16") -> Path:
    """A seeded random VGG saved with torchvision's key names, as a weights file in models/vgg would be."""
    vgg = random_vgg(arch, width=4)
    state = {}
    for index, conv in zip(torchvision_conv_indices(arch), vgg.convs, strict=True):
        state[f"features.{index}.weight"] = conv.weight.detach().clone()
        state[f"features.{index}.bias"] = conv.bias.detach().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(state, path, {"convention": "torchvision"})
    return path


@pytest.fixture
def vgg() -> VGGFeatures:
    return random_vgg(width=4)


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "vgg"
    folder.mkdir()
    monkeypatch.setattr(comfy, "fallback_models_dir", folder)
    monkeypatch.setattr(loader, "_cache", type(loader._cache)())
    return folder


def style_losses(style_batch: int = 1, **mask) -> list:
    (terms,) = run(
        "FusionStyleGlobalStyleLoss",
        style_image=images(style_batch, 40, 32, seed=1),
        weight=20.0,
        layers="relu1_2,relu2_2,relu3_3",
        style_scale=1.0,
        **mask,
    )
    (terms,) = run(
        "FusionStyleLocalPatchLoss",
        style_image=images(style_batch, 40, 32, seed=1),
        weight=1e-4,
        layer="relu3_1",
        patch_size=3,
        stride=1,
        style_scale=1.0,
        style_losses=terms,
        **mask,
    )
    return terms


def optimize_inputs(vgg, content, terms, **overrides) -> dict:
    inputs = dict(
        vgg=vgg,
        content_image=content,
        style_losses=terms,
        content_weight=20.0,
        content_layer="relu3_1",
        size=32,
        levels=1,
        iterations=3,
        init="random",
        seed=0,
    )
    return {**inputs, **overrides}


# --- the node definitions ----------------------------------------------------------------------------


def test_mappings_are_prefixed_and_named():
    assert set(NODES) == set(fusion_style.NODE_DISPLAY_NAME_MAPPINGS)
    assert all(name.startswith("FusionStyle") for name in NODES)
    assert fusion_style.NODE_DISPLAY_NAME_MAPPINGS["FusionStyleFusedOptimize"] == "Fused Style Optimize"


@pytest.mark.parametrize("name", sorted(NODES))
def test_input_types_are_well_formed(name):
    cls = NODES[name]
    assert cls.CATEGORY == "style_transfer/fusion"
    assert cls.DESCRIPTION.strip()
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional"} and spec["required"]
    for section in spec.values():
        for input_name, (kind, options) in section.items():
            assert options.get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"
            if isinstance(kind, list):
                assert kind and all(isinstance(choice, str) for choice in kind)
                assert options.get("default", kind[0]) in kind
            elif kind in ("INT", "FLOAT"):
                low, high, default = options["min"], options["max"], options["default"]
                assert low <= default <= high, f"{name}.{input_name}: default {default} outside {low}..{high}"
                step = options.get("step", 1 if kind == "INT" else 0.5)
                if kind == "INT":
                    assert all(isinstance(v, int) for v in (low, high, default, step))
                    assert (default - low) % step == 0  # the widget snaps to min + k * step
                else:
                    # The frontend rounds a FLOAT widget to the decimals of its step: the default must survive.
                    decimals = max(0, -math.floor(math.log10(step)))
                    assert round(default, decimals) == default, f"{name}.{input_name}: {default} rounds away"
            else:
                assert isinstance(kind, str) and kind.isupper()
                if kind == "STRING":
                    assert isinstance(options["default"], str)


@pytest.mark.parametrize("name", sorted(NODES))
def test_function_takes_exactly_the_inputs(name):
    cls = NODES[name]
    spec = cls.INPUT_TYPES()
    parameters = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    names = [p for p in parameters if p != "self"]
    assert names == [*spec["required"], *spec.get("optional", {})]
    assert all(parameters[p].default is None for p in spec.get("optional", {}))


def test_local_weight_default_is_the_paper_value():
    (_, options) = NODES["FusionStyleLocalPatchLoss"].INPUT_TYPES()["required"]["weight"]
    assert options["default"] == 1e-4 and options["min"] == 0


def test_seed_has_control_after_generate_and_the_full_range():
    (_, options) = NODES["FusionStyleFusedOptimize"].INPUT_TYPES()["required"]["seed"]
    assert options["control_after_generate"] is True
    assert options["min"] == 0 and options["max"] == 0xFFFFFFFFFFFFFFFF


# --- Load VGG ------------------------------------------------------------------------------------------


def test_load_vgg_lists_and_loads_a_file_once(models_dir):
    path = write_weights(models_dir / "tiny_vgg16.safetensors")
    (choices, options) = NODES["FusionStyleLoadVGG"].INPUT_TYPES()["required"]["weights"]
    assert choices == ["vgg19", "tiny_vgg16.safetensors"] and options["default"] == "vgg19"

    (vgg,) = run("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="auto", pooling="max")
    assert isinstance(vgg, VGGFeatures) and vgg.arch == "vgg16"
    assert not any(p.is_inference() for p in vgg.parameters())  # loaded for autograd despite inference mode
    (again,) = run("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="auto", pooling="max")
    assert again is vgg
    (avg,) = run("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="caffe", pooling="avg")
    assert avg is not vgg and (avg.convention, avg.pooling) == ("caffe", "avg")

    before = NODES["FusionStyleLoadVGG"].IS_CHANGED("tiny_vgg16.safetensors", "auto", "max")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file replaced on disk
    assert NODES["FusionStyleLoadVGG"].IS_CHANGED("tiny_vgg16.safetensors", "auto", "max") != before
    (reloaded,) = run("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="auto", pooling="max")
    assert reloaded is not vgg


def test_load_vgg_finds_vgg19_in_the_models_folder_without_download(models_dir):
    write_weights(models_dir / "vgg19.safetensors", arch="vgg19")
    (vgg,) = run("FusionStyleLoadVGG", weights="vgg19", convention="auto", pooling="max")
    assert vgg.arch == "vgg19"


def test_load_vgg_missing_or_bad_file_is_a_clear_error(models_dir):
    with pytest.raises(FusionError, match="weights: 'gone.safetensors' is not in the vgg model folder"):
        run("FusionStyleLoadVGG", weights="gone.safetensors", convention="auto", pooling="max")
    (models_dir / "broken.safetensors").write_bytes(b"not a model")
    with pytest.raises(FusionError, match="broken.safetensors is not a readable safetensors file"):
        run("FusionStyleLoadVGG", weights="broken.safetensors", convention="auto", pooling="max")
    assert NODES["FusionStyleLoadVGG"].IS_CHANGED("gone.safetensors", "auto", "max") == "missing"


# --- the style losses ------------------------------------------------------------------------------------


def test_global_loss_makes_a_term_and_chains_without_mutating():
    previous = [LocalStyle(torch.rand(1, 3, 8, 8))]
    (terms,) = run(
        "FusionStyleGlobalStyleLoss",
        style_image=images(1, 24, 20),
        weight=20.0,
        layers=" relu1_2, relu3_3 ",
        style_scale=2.0,
        style_losses=previous,
    )
    assert len(previous) == 1 and terms[0] is previous[0]
    term = terms[1]
    assert isinstance(term, GlobalStyle)
    assert term.image.shape == (1, 3, 24, 20)
    assert (term.weight, term.layers, term.scale, term.target_mask) == (20.0, ("relu1_2", "relu3_3"), 2.0, None)


def test_local_loss_makes_a_term():
    (terms,) = run(
        "FusionStyleLocalPatchLoss",
        style_image=images(1, 24, 20),
        weight=1e-4,
        layer="relu2_1",
        patch_size=5,
        stride=2,
        style_scale=1.0,
    )
    (term,) = terms
    assert isinstance(term, LocalStyle)
    assert (term.weight, term.layer, term.patch_size, term.stride) == (1e-4, "relu2_1", 5, 2)


def test_style_batch_blends_equally():
    terms = style_losses(style_batch=3)
    assert [type(t).__name__ for t in terms] == ["GlobalStyle"] * 3 + ["LocalStyle"] * 3
    assert [t.weight for t in terms[:3]] == pytest.approx([20 / 3] * 3)
    assert [t.weight for t in terms[3:]] == pytest.approx([1e-4 / 3] * 3)
    assert len({id(t.image) for t in terms[:3]}) == 3


def style_pair(style_image, blend, previous=None) -> list:
    """A Global + Local loss pair for one style at ``blend``, chained after ``previous``."""
    (terms,) = run(
        "FusionStyleGlobalStyleLoss",
        style_image=style_image,
        weight=20.0,
        layers="relu1_2,relu2_2,relu3_3",
        style_scale=1.0,
        style_losses=previous,
        blend=blend,
    )
    (terms,) = run(
        "FusionStyleLocalPatchLoss",
        style_image=style_image,
        weight=1e-4,
        layer="relu3_1",
        patch_size=3,
        stride=1,
        style_scale=1.0,
        style_losses=terms,
        blend=blend,
    )
    return terms


def test_blend_defaults_to_one_and_stays_in_0_1():
    for name in ("FusionStyleGlobalStyleLoss", "FusionStyleLocalPatchLoss"):
        (kind, options) = NODES[name].INPUT_TYPES()["optional"]["blend"]
        assert (kind, options["default"], options["min"], options["max"]) == ("FLOAT", 1.0, 0.0, 1.0)


def test_blend_multiplies_the_weight_on_top_of_the_batch_split():
    a = style_pair(images(1, 40, 32, seed=1), blend=0.7)
    ab = style_pair(images(2, 40, 32, seed=2), blend=0.3, previous=a)
    assert [t.weight for t in ab] == pytest.approx([20 * 0.7, 1e-4 * 0.7] + [20 * 0.3 / 2] * 2 + [1e-4 * 0.3 / 2] * 2)
    assert [t.weight for t in style_pair(images(1, 40, 32), blend=None)] == [20.0, 1e-4]  # not given: 1
    assert [t.weight for t in style_pair(images(1, 40, 32), blend=0.0)] == [0.0, 0.0]  # a zero-weight term


def test_blend_one_to_zero_reproduces_the_single_style_exactly(vgg):
    style_a, style_b, content = images(1, 40, 32, seed=1), images(1, 36, 36, seed=2), images(1, 32, 32, seed=3)
    single = style_pair(style_a, blend=1.0)
    both = style_pair(style_b, blend=0.0, previous=style_pair(style_a, blend=1.0))
    assert len(both) == 4
    (alone,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, single, levels=2))
    (blended,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, both, levels=2))
    assert torch.equal(alone, blended)
    # ... and the other style does count when it has a share.
    mixed = style_pair(style_b, blend=0.5, previous=style_pair(style_a, blend=0.5))
    (half,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, mixed, levels=2))
    assert not torch.equal(alone, half)


@pytest.mark.parametrize(
    "name, inputs",
    [
        ("FusionStyleGlobalStyleLoss", {"layers": "relu1_1"}),
        ("FusionStyleLocalPatchLoss", {"layer": "relu3_1", "patch_size": 3, "stride": 1}),
    ],
)
def test_masks_are_single(name, inputs):
    inputs = dict(style_image=images(1, 16, 16), weight=1.0, style_scale=1.0, **inputs)
    for mask in (torch.ones(12, 10), torch.ones(1, 12, 10)):
        (terms,) = run(name, mask=mask, style_mask=mask, **inputs)
        assert terms[0].target_mask.shape == terms[0].style_mask.shape == (12, 10)
    with pytest.raises(FusionError, match="mask: expected one mask, got a batch of 2"):
        run(name, mask=torch.ones(2, 12, 10), **inputs)


def test_bad_layers_are_a_clear_error():
    with pytest.raises(FusionError, match="layers: unknown layer.*'relu9_9'.*valid: relu1_1"):
        run(
            "FusionStyleGlobalStyleLoss",
            style_image=images(1, 16, 16),
            weight=1.0,
            layers="relu1_1,relu9_9",
            style_scale=1.0,
        )
    with pytest.raises(FusionError, match="layers: give at least one layer"):
        run("FusionStyleGlobalStyleLoss", style_image=images(1, 16, 16), weight=1.0, layers=" , ", style_scale=1.0)


def test_bad_image_is_a_clear_error():
    with pytest.raises(FusionError, match=r"style_image: expected a ComfyUI IMAGE of shape \(batch, height, width"):
        run(
            "FusionStyleLocalPatchLoss",
            style_image=torch.rand(16, 16, 3),
            weight=1.0,
            layer="relu3_1",
            patch_size=3,
            stride=1,
            style_scale=1.0,
        )


# --- Fused Style Optimize --------------------------------------------------------------------------------


def test_optimize_runs_in_inference_mode_at_the_content_aspect_ratio(vgg):
    (image,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, images(1, 30, 45), style_losses(), size=48))
    assert image.shape == (1, 32, 48, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert image.min() >= 0 and image.max() <= 1


def test_optimize_batch_gives_each_result_as_if_alone(vgg):
    contents = images(2, 32, 32, seed=5)
    terms = style_losses()
    (batch,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, contents, terms))
    (second,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, contents[1:], terms))
    assert batch.shape == (2, 32, 32, 3)
    torch.testing.assert_close(batch[1:], second)
    assert not torch.equal(batch[0], batch[1])


def test_optimize_seed_and_init(vgg):
    content, terms = images(1, 32, 32), style_losses()
    (a,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, seed=0xFFFFFFFFFFFFFFFF))
    (b,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, seed=0xFFFFFFFFFFFFFFFF))
    (c,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, seed=1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    (d,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, init="content", levels=2))
    assert d.shape == (1, 32, 32, 3)


def test_optimize_with_masked_styles(vgg):
    mask = torch.zeros(1, 32, 32)
    mask[:, :, 16:] = 1
    (image,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, images(1, 32, 32), style_losses(mask=mask)))
    assert image.shape == (1, 32, 32, 3)


def test_optimize_color_mode(vgg):
    (image,) = run(
        "FusionStyleFusedOptimize", **optimize_inputs(vgg, images(1, 32, 32), style_losses(), color="luminance")
    )
    assert image.shape == (1, 32, 32, 3)


def test_optimize_new_inputs_default_to_the_library_defaults():
    optional = NODES["FusionStyleFusedOptimize"].INPUT_TYPES()["optional"]
    defaults = Settings()
    assert optional["optimizer"][0] == list(OPTIMIZERS) and optional["matcher"][0] == list(MATCHERS)
    for name in ("color", "optimizer", "tv_weight", "matcher", "rematch_every", "mixed_precision"):
        assert optional[name][1]["default"] == getattr(defaults, name), name
    required = NODES["FusionStyleFusedOptimize"].INPUT_TYPES()["required"]
    assert required["init"][0] == list(INITS) and required["init"][1]["default"] == defaults.init
    assert optional["preset"][0] == list(PRESETS) and optional["preset"][1]["default"] == "default"
    assert defaults.learning_rate is None and optional["learning_rate"][1]["default"] == 0  # 0 stands for None
    assert optional["tv_weight"][1]["min"] == optional["learning_rate"][1]["min"] == 0
    assert optional["rematch_every"][1]["min"] == 1


def capture_settings(monkeypatch, vgg, **inputs) -> Settings:
    """The Settings Fused Style Optimize hands to fusion_core for ``inputs``."""
    captured = []

    def fake_stylize(vgg, content, styles, settings, **kwargs):
        captured.append(settings)
        return content

    monkeypatch.setattr(optimize, "stylize", fake_stylize)
    run("FusionStyleFusedOptimize", **optimize_inputs(vgg, images(1, 32, 32), style_losses(), **inputs))
    (settings,) = captured
    return settings


def test_optimize_optimiser_inputs_reach_fusion_core(monkeypatch, vgg):
    settings = capture_settings(
        monkeypatch, vgg, optimizer="adam", learning_rate=0.05, tv_weight=5.0, matcher="exact", rematch_every=4
    )
    assert (settings.optimizer, settings.learning_rate, settings.tv_weight) == ("adam", 0.05, 5.0)
    assert (settings.matcher, settings.rematch_every) == ("exact", 4)
    settings = capture_settings(
        monkeypatch, vgg, optimizer="lbfgs", learning_rate=0.0, tv_weight=0.0, mixed_precision=False
    )
    assert settings.learning_rate is None  # 0: the optimiser's own default
    assert settings.mixed_precision is False
    defaults, omitted = Settings(), capture_settings(monkeypatch, vgg)  # an old workflow without the new inputs
    for name in ("color", "optimizer", "learning_rate", "tv_weight", "matcher", "rematch_every", "mixed_precision"):
        assert getattr(omitted, name) == getattr(defaults, name), name
    assert (omitted.local_all_levels, omitted.global_layers) == (False, None)  # no preset input: the default one


def test_optimize_paper_preset_wins_over_the_widgets(monkeypatch, vgg):
    settings = capture_settings(monkeypatch, vgg, init="recolored", tv_weight=10.0, preset="paper")
    assert (settings.init, settings.tv_weight, settings.local_all_levels) == ("random", 0.0, True)
    assert settings.global_layers == ("relu1_2", "relu2_2", "relu3_3", "relu4_2")
    settings = capture_settings(monkeypatch, vgg, init="content", tv_weight=3.0, preset="default")
    assert (settings.init, settings.tv_weight, settings.local_all_levels) == ("content", 3.0, False)
    with pytest.raises(FusionError, match="preset: 'gatys' is not one of default, paper"):
        capture_settings(monkeypatch, vgg, preset="gatys")


def test_optimize_with_adam_and_tv(vgg):
    content, terms = images(1, 32, 32), style_losses()
    (lbfgs,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms))
    (adam,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, optimizer="adam"))
    (smooth,) = run(
        "FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, optimizer="adam", tv_weight=1000.0)
    )
    assert adam.shape == smooth.shape == (1, 32, 32, 3) and not torch.equal(lbfgs, adam)
    assert adam.min() >= 0 and adam.max() <= 1

    def roughness(image):
        return (image[:, 1:] - image[:, :-1]).abs().mean() + (image[:, :, 1:] - image[:, :, :-1]).abs().mean()

    assert roughness(smooth) < roughness(adam)


@pytest.mark.parametrize("matcher", list(MATCHERS))
def test_optimize_with_each_matcher(vgg, matcher):
    inputs = optimize_inputs(vgg, images(1, 32, 32), style_losses(), matcher=matcher, rematch_every=2)
    (image,) = run("FusionStyleFusedOptimize", **inputs)
    assert image.shape == (1, 32, 32, 3)


def test_optimize_bad_settings_are_clear_errors(vgg):
    with pytest.raises(FusionError, match="size: at the coarsest level"):
        run("FusionStyleFusedOptimize", **optimize_inputs(vgg, images(1, 32, 32), style_losses(), size=64, levels=6))
    vgg16 = random_vgg("vgg16", width=4)
    with pytest.raises(FusionError, match="layers: unknown layer.*'relu3_4' for vgg16"):
        run(
            "FusionStyleFusedOptimize",
            **optimize_inputs(vgg16, images(1, 32, 32), style_losses(), content_layer="relu3_4"),
        )


# --- ComfyUI's services, faked ---------------------------------------------------------------------------


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
def comfyui(tmp_path, monkeypatch):
    fake = FakeComfyUI(tmp_path)
    monkeypatch.setattr(loader, "_cache", type(loader._cache)())
    with patch.dict(sys.modules, fake.modules):
        yield fake


def test_models_folder_extends_extra_model_paths(comfyui, tmp_path):
    fp = comfyui.folder_paths
    fp.add_model_folder_path("vgg", str(tmp_path / "shared_vgg"))  # from extra_model_paths.yaml
    comfy.register_models_folder()
    comfy.register_models_folder()  # ComfyUI may import the pack again: no duplicate entry
    default = os.path.join(fp.models_dir, "vgg")
    assert fp.get_folder_paths("vgg") == [str(tmp_path / "shared_vgg"), default]
    assert fp.folder_names_and_paths["vgg"][1] == {".safetensors", ".pth", ".pt"}

    write_weights(Path(default) / "tiny.safetensors")
    (Path(default) / "readme.txt").write_text("not a model")
    (choices, _) = NODES["FusionStyleLoadVGG"].INPUT_TYPES()["required"]["weights"]
    assert choices == ["vgg19", "tiny.safetensors"]
    (vgg,) = run("FusionStyleLoadVGG", weights="tiny.safetensors", convention="auto", pooling="max")
    assert vgg.arch == "vgg16"
    assert comfy.models_dirs()[0] == str(tmp_path / "shared_vgg")  # where vgg19 would be downloaded


def test_optimize_uses_comfyui_device_progress_and_preview(comfyui, vgg):
    inputs = optimize_inputs(vgg, images(2, 32, 32), style_losses(), levels=2, iterations=optimize.PREVIEW_EVERY)
    (image,) = run("FusionStyleFusedOptimize", **inputs)
    assert image.shape == (2, 32, 32, 3)
    steps = 2 * optimize.PREVIEW_EVERY
    assert [value for value, _, _ in comfyui.updates] == list(range(1, 2 * steps + 1))
    assert {total for _, total, _ in comfyui.updates} == {2 * steps}
    previews = [(value, preview) for value, _, preview in comfyui.updates if preview is not None]
    assert [value for value, _ in previews] == [5, 10, 15, 20]  # the end of every level, every PREVIEW_EVERY
    for _, (fmt, picture, size) in previews:
        assert fmt == "JPEG" and isinstance(picture, Image.Image) and size == 256
    assert picture.size == (32, 32)
    assert comfyui.calls == ["free_memory", "offload", "soft_empty_cache"]


def test_cancel_stops_within_one_iteration_and_the_next_run_works(comfyui, vgg):
    comfyui.interrupt_at = 2
    inputs = optimize_inputs(vgg, images(1, 32, 32), style_losses(), iterations=50)
    with pytest.raises(comfyui.mm.InterruptProcessingException):
        run("FusionStyleFusedOptimize", **inputs)
    assert [value for value, _, _ in comfyui.updates] == [1, 2]
    assert not comfyui.interrupted  # ComfyUI's flag is cleared by its own exception
    assert comfyui.calls[-2:] == ["offload", "soft_empty_cache"]  # the model is put away after a cancel too

    comfyui.interrupt_at = None
    comfyui.updates.clear()
    (image,) = run("FusionStyleFusedOptimize", **{**inputs, "iterations": 3})
    assert image.shape == (1, 32, 32, 3) and len(comfyui.updates) == 3


def test_without_comfyui_the_services_fall_back():
    absent = dict.fromkeys(["comfy", "comfy.model_management", "comfy.utils", "comfy.cli_args", "folder_paths"])
    with patch.dict(sys.modules, absent):  # None in sys.modules: importing it raises ImportError
        assert comfy.torch_device() == comfy.offload_device() == torch.device("cpu")
        assert comfy.should_stop() is False and comfy.download_progress() is None
        comfy.progress_bar(10)(1, None)  # no progress bar: nothing happens
        comfy.register_models_folder()
        with pytest.raises(fusion_style.fusion_core.Cancelled):
            comfy.raise_interrupted(fusion_style.fusion_core.Cancelled("stopped"))


# --- boundaries and import -------------------------------------------------------------------------------


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(top-level module name, nesting depth of the import statement) of every absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.col_offset) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.col_offset))
    return found


def test_fusion_core_never_imports_comfyui():
    for path in sorted((ROOT / "fusion_core").glob("*.py")):
        names = {name for name, _ in imported_modules(path)}
        assert not names & set(COMFYUI_MODULES), f"{path.name} imports ComfyUI"


def test_only_nodes_comfy_touches_comfyui_and_only_lazily():
    for path in sorted((ROOT / "nodes").glob("*.py")):
        names = {name for name, _ in imported_modules(path)}
        assert not names & set(COMFYUI_MODULES), f"nodes/{path.name} imports ComfyUI at module level"
    source = (ROOT / "nodes" / "comfy.py").read_text(encoding="utf-8")
    for module in ("comfy.model_management", "comfy.utils", "comfy.cli_args", "folder_paths"):
        assert f'_module("{module}")' in source


def test_pack_imports_without_comfyui_as_comfyui_loads_it():
    # ComfyUI names the package after the folder's full path and runs its __init__.py; a fresh interpreter,
    # no ComfyUI on the path, nothing from this repository on sys.path.
    script = f"""
import importlib.util, sys
name = {str(ROOT / "custom_nodes.fusion_style").replace(".", "_x_")!r}
spec = importlib.util.spec_from_file_location(name, {str(ROOT / "__init__.py")!r})
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
assert not any(m in sys.modules for m in {COMFYUI_MODULES!r}), "imported ComfyUI"
assert "fusion_core" not in sys.modules, "fusion_core imported as a top-level module"
print(sorted(module.NODE_CLASS_MAPPINGS))
"""
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd="/", timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(NODES))


# --- robustness of the IMAGE inputs ------------------------------------------------------------------


def test_rgba_and_grey_images_are_converted(vgg):
    rgb = images(1, 24, 32, seed=3)
    with torch.inference_mode():
        rgba = torch.cat([rgb, torch.rand(1, 24, 32, 1)], -1)
        grey = rgb[..., :1]
    terms = style_losses()
    (from_rgba,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, rgba, terms))
    (from_rgb,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, rgb, terms))
    assert torch.equal(from_rgba, from_rgb)  # the alpha channel is ignored
    (from_grey,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, grey, terms))
    (from_grey3,) = run("FusionStyleFusedOptimize", **optimize_inputs(vgg, grey.expand(-1, -1, -1, 3), terms))
    assert torch.equal(from_grey, from_grey3)
    with pytest.raises(FusionError, match=r"content_image: expected a ComfyUI IMAGE .* got \(1, 24, 32, 2\)"):
        run("FusionStyleFusedOptimize", **optimize_inputs(vgg, rgb[..., :2], terms))


def test_a_failing_batch_item_is_named(vgg):
    with torch.inference_mode():
        batch = images(3, 24, 32, seed=4).clone()
        batch[2, 0, 0, 0] = float("nan")
    with pytest.raises(FusionError, match=r"content_image\[2\] \(of a batch of 3\): content: the image contains NaN"):
        run("FusionStyleFusedOptimize", **optimize_inputs(vgg, batch, style_losses()))
