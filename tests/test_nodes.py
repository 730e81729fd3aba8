"""The ComfyUI nodes, without ComfyUI: tiny seeded networks and images, run under torch.inference_mode() as
ComfyUI runs them. ComfyUI's services are faked in sys.modules where their use is what is tested."""

from __future__ import annotations

import ast
import inspect
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import fusion_style
import pytest
import torch
from fusion_style.fusion_core import FusionError, GlobalStyle, LocalStyle, Settings, VGGFeatures, random_vgg
from fusion_style.fusion_core.choices import blend_shares
from fusion_style.fusion_core.config import COLOR_MODES, INITS, MATCHER_NAMES, OPTIMIZERS, PRESET_WEIGHTS, PRESETS
from fusion_style.fusion_core.images import resize
from fusion_style.fusion_core.stylize import stylize
from fusion_style.nodes import comfy, optimize
from helpers import call_node, comfy_images, loss_chain, run_node, write_tiny_vgg
from PIL import Image, ImageOps

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
# Fused Style Optimize's inputs in these tests, unless a test overrides them: tiny and quick.
OPTIMIZE = dict(
    content_weight=20.0,
    content_layer="relu3_1",
    size=32,
    levels=1,
    iterations=3,
    final_iterations=0,
    init="random",
    seed=0,
)


OMITTED = object()  # an input an old workflow does not have


def optimize_inputs(vgg, content, terms, **overrides) -> dict:
    inputs = {"vgg": vgg, "content_image": content, "style_losses": terms, **OPTIMIZE, **overrides}
    return {name: value for name, value in inputs.items() if value is not OMITTED}


def library_result(vgg, content_image, style_image, *, mask=None, style_scale=1.0, **settings) -> torch.Tensor:
    """What Fused Style Optimize must give for ``optimize_inputs(vgg, content_image, loss_chain(style_image, ...),
    **settings)``: fusion_core's stylize called directly, outside inference mode, with the terms and Settings
    written out by hand from the nodes' inputs (the nodes are a thin translation of them)."""

    def as_library_image(image):  # ComfyUI (1, H, W, 3) -> fusion_core (1, 3, H, W), an ordinary tensor
        return image.movedim(-1, 1).contiguous()

    style = as_library_image(style_image)
    target_mask = None if mask is None else mask.reshape(mask.shape[-2:]).clone()
    terms = [
        GlobalStyle(
            style, weight=20.0, layers=("relu1_2", "relu2_2", "relu3_3"), target_mask=target_mask, scale=style_scale
        ),
        LocalStyle(
            style, weight=2.5e-5, layer="relu3_1", patch_size=3, stride=1, target_mask=target_mask, scale=style_scale
        ),
    ]
    image = stylize(vgg, as_library_image(content_image), terms, Settings(**{**OPTIMIZE, **settings}))
    return image.movedim(1, -1)


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


@pytest.mark.parametrize("name", sorted(NODES))
def test_every_node_is_found_by_the_method_names(name):
    # ComfyUI (server.py node_info) sends getattr(cls, "SEARCH_ALIASES", []) as /object_info's "search_aliases",
    # which the node search matches; older versions ignore the attribute.
    aliases = NODES[name].SEARCH_ALIASES
    assert isinstance(aliases, list) and all(isinstance(a, str) and a.strip() for a in aliases)
    assert len(set(aliases)) == len(aliases)
    for word in ("style transfer", "neural style", "Gatys", "CNNMRF", "MRF", "Gram", "VGG"):
        assert word in aliases, f"{name} is not found by {word!r}"


def test_learning_rate_says_auto_rather_than_zero():
    optional = NODES["FusionStyleFusedOptimize"].INPUT_TYPES()["optional"]
    modes, mode_options = optional["learning_rate_mode"]
    kind, options = optional["learning_rate"]
    assert modes == ["auto", "manual"] and mode_options["default"] == "auto"
    assert kind == "FLOAT" and options["default"] > 0 and options["min"] > 0  # no value reads as "no learning"
    # the mode comes first, so the widgets read "learning_rate_mode auto" then the value it switches on
    names = list(optional)
    assert names.index("learning_rate_mode") + 1 == names.index("learning_rate")


def test_weight_defaults_are_the_library_defaults():
    for name, kind in (("FusionStyleGlobalStyleLoss", "global"), ("FusionStyleLocalPatchLoss", "local")):
        (_, options) = NODES[name].INPUT_TYPES()["required"]["weight"]
        assert options["default"] == PRESET_WEIGHTS["default"][kind] and options["min"] == 0


def test_seed_has_control_after_generate_and_the_full_range():
    (_, options) = NODES["FusionStyleFusedOptimize"].INPUT_TYPES()["required"]["seed"]
    assert options["control_after_generate"] is True
    assert options["min"] == 0 and options["max"] == 0xFFFFFFFFFFFFFFFF


# --- Load VGG ------------------------------------------------------------------------------------------


def test_load_vgg_lists_and_loads_a_file_once(models_dir):
    path = write_tiny_vgg(models_dir / "tiny_vgg16.safetensors")
    (choices, options) = NODES["FusionStyleLoadVGG"].INPUT_TYPES()["required"]["weights"]
    assert choices == ["vgg19", "tiny_vgg16.safetensors"] and options["default"] == "vgg19"

    (vgg,) = run_node("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="auto", pooling="max")
    assert isinstance(vgg, VGGFeatures) and vgg.arch == "vgg16"
    assert not any(p.is_inference() for p in vgg.parameters())  # loaded for autograd despite inference mode
    (again,) = run_node("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="auto", pooling="max")
    assert again is vgg
    (avg,) = run_node("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="caffe", pooling="avg")
    assert avg is not vgg and (avg.convention, avg.pooling) == ("caffe", "avg")

    before = NODES["FusionStyleLoadVGG"].IS_CHANGED("tiny_vgg16.safetensors", "auto", "max")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file replaced on disk
    assert NODES["FusionStyleLoadVGG"].IS_CHANGED("tiny_vgg16.safetensors", "auto", "max") != before
    (reloaded,) = run_node("FusionStyleLoadVGG", weights="tiny_vgg16.safetensors", convention="auto", pooling="max")
    assert reloaded is not vgg


def test_load_vgg_finds_vgg19_in_the_models_folder_without_download(models_dir):
    write_tiny_vgg(models_dir / "vgg19.safetensors", arch="vgg19")
    (vgg,) = run_node("FusionStyleLoadVGG", weights="vgg19", convention="auto", pooling="max")
    assert vgg.arch == "vgg19"


def test_load_vgg_missing_or_bad_file_is_a_clear_error(models_dir):
    with pytest.raises(FusionError, match="weights: 'gone.safetensors' is not in the vgg model folder"):
        run_node("FusionStyleLoadVGG", weights="gone.safetensors", convention="auto", pooling="max")
    (models_dir / "broken.safetensors").write_bytes(b"not a model")
    with pytest.raises(FusionError, match="broken.safetensors is not a readable safetensors file"):
        run_node("FusionStyleLoadVGG", weights="broken.safetensors", convention="auto", pooling="max")
    assert NODES["FusionStyleLoadVGG"].IS_CHANGED("gone.safetensors", "auto", "max") == "missing"


# --- the style losses ------------------------------------------------------------------------------------


def test_global_loss_makes_a_term_and_chains_without_mutating():
    previous = [LocalStyle(torch.rand(1, 3, 8, 8))]
    style = comfy_images(1, 24, 20)
    (terms,) = run_node(
        "FusionStyleGlobalStyleLoss",
        style_image=style,
        weight=20.0,
        layers=" relu1_2, relu3_3 ",
        style_scale=2.0,
        style_losses=previous,
    )
    assert len(previous) == 1 and terms[0] is previous[0]
    term = terms[1]
    assert isinstance(term, GlobalStyle)
    assert torch.equal(term.image, style.movedim(-1, 1))  # the IMAGE as fusion_core's (1, 3, H, W)
    assert (term.weight, term.layers, term.scale, term.target_mask) == (20.0, ("relu1_2", "relu3_3"), 2.0, None)


def test_local_loss_makes_a_term():
    (terms,) = run_node(
        "FusionStyleLocalPatchLoss",
        style_image=comfy_images(1, 24, 20),
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
    terms = loss_chain(comfy_images(3, 40, 32, seed=1))
    assert [type(t).__name__ for t in terms] == ["GlobalStyle"] * 3 + ["LocalStyle"] * 3
    assert [t.weight for t in terms] == [20.0] * 3 + [2.5e-5] * 3
    assert blend_shares(terms) == pytest.approx([1 / 3] * 6)  # the run's share of each kind's weight
    assert len({id(t.image) for t in terms[:3]}) == 3


def test_blend_defaults_to_one_and_stays_in_0_1():
    for name in ("FusionStyleGlobalStyleLoss", "FusionStyleLocalPatchLoss"):
        (kind, options) = NODES[name].INPUT_TYPES()["optional"]["blend"]
        assert (kind, options["default"], options["min"], options["max"]) == ("FLOAT", 1.0, 0.0, 1.0)


def test_blend_shares_the_weight_with_the_batch_split():
    a = loss_chain(comfy_images(1, 40, 32, seed=1), blend=0.7)
    ab = loss_chain(comfy_images(2, 40, 32, seed=2), blend=0.3, style_losses=a)
    assert [t.blend for t in ab] == pytest.approx([0.7, 0.7, 0.15, 0.15, 0.15, 0.15])
    assert [t.weight for t in ab] == [20.0, 2.5e-5, 20.0, 20.0, 2.5e-5, 2.5e-5]
    assert blend_shares(ab) == pytest.approx([0.7, 0.7, 0.15, 0.15, 0.15, 0.15])
    assert [t.blend for t in loss_chain(comfy_images(1, 40, 32), blend=None)] == [1.0, 1.0]  # not given: 1
    assert [t.blend for t in loss_chain(comfy_images(1, 40, 32), blend=0.0)] == [0.0, 0.0]  # a term of no weight


def test_blend_one_to_zero_reproduces_the_single_style_exactly(node_vgg):
    vgg, style_a, style_b = node_vgg, comfy_images(1, 40, 32, seed=1), comfy_images(1, 36, 36, seed=2)
    content = comfy_images(1, 32, 32, seed=3)
    single = loss_chain(style_a, blend=1.0)
    both = loss_chain(style_b, blend=0.0, style_losses=loss_chain(style_a, blend=1.0))
    assert len(both) == 4
    (alone,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, single, levels=2))
    (blended,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, both, levels=2))
    assert torch.equal(alone, blended)
    # ... and the other style does count when it has a share.
    mixed = loss_chain(style_b, blend=0.5, style_losses=loss_chain(style_a, blend=0.5))
    (half,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, mixed, levels=2))
    assert not torch.equal(alone, half)


@pytest.mark.parametrize(
    "name, inputs",
    [
        ("FusionStyleGlobalStyleLoss", {"layers": "relu1_1"}),
        ("FusionStyleLocalPatchLoss", {"layer": "relu3_1", "patch_size": 3, "stride": 1}),
    ],
)
def test_masks_are_single(name, inputs):
    inputs = dict(style_image=comfy_images(1, 16, 16), weight=1.0, style_scale=1.0, **inputs)
    plane = torch.rand(12, 10, generator=torch.Generator().manual_seed(0))
    for mask in (plane, plane[None]):  # ComfyUI's MASK: (H, W) or a batch of one
        (terms,) = run_node(name, mask=mask, style_mask=mask, **inputs)
        assert torch.equal(terms[0].target_mask, plane) and torch.equal(terms[0].style_mask, plane)
    with pytest.raises(FusionError, match="mask: expected one mask, got a batch of 2"):
        run_node(name, mask=torch.ones(2, 12, 10), **inputs)


def test_bad_layers_are_a_clear_error():
    with pytest.raises(FusionError, match="layers: unknown layer.*'relu9_9'.*valid: relu1_1"):
        run_node(
            "FusionStyleGlobalStyleLoss",
            style_image=comfy_images(1, 16, 16),
            weight=1.0,
            layers="relu1_1,relu9_9",
            style_scale=1.0,
        )
    with pytest.raises(FusionError, match="layers: give at least one layer"):
        run_node(
            "FusionStyleGlobalStyleLoss", style_image=comfy_images(1, 16, 16), weight=1.0, layers=" , ", style_scale=1.0
        )


def test_bad_image_is_a_clear_error():
    with pytest.raises(FusionError, match=r"style_image: expected a ComfyUI IMAGE of shape \(batch, height, width"):
        run_node(
            "FusionStyleLocalPatchLoss",
            style_image=torch.rand(16, 16, 3),
            weight=1.0,
            layer="relu3_1",
            patch_size=3,
            stride=1,
            style_scale=1.0,
        )


# --- Fused Style Optimize --------------------------------------------------------------------------------


def test_optimize_under_inference_mode_equals_the_call_outside_it(node_vgg, style_terms):
    content = comfy_images(1, 30, 45)
    inputs = optimize_inputs(node_vgg, content, style_terms, size=48, init="content")
    (image,) = run_node("FusionStyleFusedOptimize", **inputs)  # under torch.inference_mode(), as ComfyUI runs it
    assert image.shape == (1, 32, 48, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert image.min() >= 0 and image.max() <= 1
    (outside,) = call_node("FusionStyleFusedOptimize", **inputs)
    torch.testing.assert_close(image, outside, rtol=0, atol=0)
    # ... and the optimisation did run: the result has moved from its start, the content at the output size.
    start = resize(content.movedim(-1, 1), (32, 48)).movedim(1, -1)
    assert (image - start).abs().mean() > 1e-3


def test_optimize_batch_gives_each_result_as_if_alone(node_vgg, style_terms):
    contents = comfy_images(2, 32, 32, seed=5)
    (batch,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(node_vgg, contents, style_terms))
    (second,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(node_vgg, contents[1:], style_terms))
    assert batch.shape == (2, 32, 32, 3)
    torch.testing.assert_close(batch[1:], second)
    assert not torch.equal(batch[0], batch[1])


def test_optimize_seed_and_init(node_vgg, content_image, style_image, style_terms):
    vgg, content, terms = node_vgg, content_image, style_terms
    (a,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, seed=0xFFFFFFFFFFFFFFFF))
    (b,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, seed=0xFFFFFFFFFFFFFFFF))
    (c,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, seed=1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    (d,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, init="content", levels=2))
    torch.testing.assert_close(d, library_result(vgg, content, style_image, init="content", levels=2))
    assert (d - a).abs().max() > 1e-2  # not the random start's result


def test_optimize_with_masked_styles_is_the_library_call_with_the_mask(node_vgg, content_image, style_image):
    mask = torch.zeros(1, 32, 32)  # a ComfyUI MASK: the styles on the right half only
    mask[:, :, 16:] = 1
    terms = loss_chain(style_image, mask=mask)
    (masked,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(node_vgg, content_image, terms))
    torch.testing.assert_close(masked, library_result(node_vgg, content_image, style_image, mask=mask))
    # Against the same styles unmasked, the result changes most where the mask switches them off.
    unmasked = library_result(node_vgg, content_image, style_image)
    change = (masked - unmasked).abs()
    assert change[:, :, :16].mean() > 2 * change[:, :, 16:].mean()


@pytest.mark.parametrize("color", COLOR_MODES)
def test_optimize_with_each_colour_mode_is_the_library_call_with_it(
    node_vgg, content_image, style_image, style_terms, color
):
    (image,) = run_node(
        "FusionStyleFusedOptimize", **optimize_inputs(node_vgg, content_image, style_terms, color=color)
    )
    expected = library_result(node_vgg, content_image, style_image, color=color)
    torch.testing.assert_close(image, expected)
    if color != "none":  # the mode changes the result: a node that dropped it would fail above
        assert (expected - library_result(node_vgg, content_image, style_image)).abs().max() > 1e-3


def test_optimize_new_inputs_default_to_the_library_defaults():
    optional = NODES["FusionStyleFusedOptimize"].INPUT_TYPES()["optional"]
    defaults = Settings()
    assert optional["optimizer"][0] == list(OPTIMIZERS) and optional["matcher"][0] == list(MATCHER_NAMES)
    for name in ("color", "optimizer", "tv_weight", "matcher", "rematch_every", "mixed_precision", "tile"):
        assert optional[name][1]["default"] == getattr(defaults, name), name
    assert optional["final_iterations"][1]["default"] == defaults.final_iterations
    required = NODES["FusionStyleFusedOptimize"].INPUT_TYPES()["required"]
    assert required["init"][0] == list(INITS) and required["init"][1]["default"] == defaults.init
    assert optional["preset"][0] == list(PRESETS) and optional["preset"][1]["default"] == "default"
    assert defaults.learning_rate is None and optional["learning_rate_mode"][1]["default"] == "auto"  # None: auto
    assert optional["tv_weight"][1]["min"] == 0
    assert optional["rematch_every"][1]["min"] == 1


def capture_settings(fake_stylize, vgg, content, terms, **inputs) -> Settings:
    """The Settings Fused Style Optimize hands to fusion_core for ``inputs``."""
    calls = fake_stylize(optimize)
    run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, **inputs))
    (settings,) = calls
    return settings


def test_optimize_optimiser_inputs_reach_fusion_core(fake_stylize, node_vgg, content_image, style_terms):
    given = (fake_stylize, node_vgg, content_image, style_terms)
    settings = capture_settings(
        *given,
        optimizer="adam",
        learning_rate_mode="manual",
        learning_rate=0.05,
        tv_weight=5.0,
        matcher="exact",
        rematch_every=4,
        tile=768,
        final_iterations=9,
    )
    assert (settings.optimizer, settings.learning_rate, settings.tv_weight) == ("adam", 0.05, 5.0)
    assert (settings.matcher, settings.rematch_every) == ("exact", 4)
    assert (settings.tile, settings.final_iterations) == (768, 9)
    settings = capture_settings(
        *given, optimizer="lbfgs", learning_rate_mode="auto", learning_rate=0.5, tv_weight=0.0, mixed_precision=False
    )
    assert settings.learning_rate is None  # auto: the optimiser's own step size, whatever the value below says
    assert settings.mixed_precision is False
    # an old workflow without the new inputs
    defaults, omitted = Settings(), capture_settings(*given, final_iterations=OMITTED)
    for name in (
        "color",
        "optimizer",
        "learning_rate",
        "tv_weight",
        "matcher",
        "rematch_every",
        "mixed_precision",
        "tile",
        "final_iterations",
        "match_content",
        "match_metric",
    ):
        assert getattr(omitted, name) == getattr(defaults, name), name
    assert (omitted.local_all_levels, omitted.global_layers) == (False, None)  # no preset input: the default one


def test_optimize_paper_preset_sets_the_widgets_left_at_their_defaults(
    fake_stylize, node_vgg, content_image, style_terms
):
    """The rule the command line follows too (fusion_core.choices): a widget the user changed wins over the preset,
    one left at its default is the preset's."""
    given = (fake_stylize, node_vgg, content_image, style_terms)
    settings = capture_settings(*given, init="recolored", tv_weight=10.0, preset="paper")  # the defaults
    assert (settings.init, settings.tv_weight, settings.local_all_levels) == ("random", 0.0, True)
    assert settings.global_layers == ("relu1_2", "relu2_2", "relu3_3", "relu4_2")
    assert (settings.match_content, settings.match_metric) == (0.0, "correlation")
    settings = capture_settings(*given, init="content", tv_weight=3.0, preset="paper", match_content=0.7)
    assert (settings.init, settings.tv_weight, settings.match_content) == ("content", 3.0, 0.7)  # the user's
    assert capture_settings(*given, preset="default").match_metric == "distance"
    assert capture_settings(*given, preset="default", match_metric="correlation").match_metric == "correlation"
    assert settings.local_all_levels  # the preset's, no widget
    settings = capture_settings(*given, init="content", tv_weight=3.0, preset="default", match_content=0.7)
    assert (settings.init, settings.tv_weight, settings.local_all_levels) == ("content", 3.0, False)
    assert settings.match_content == 0.7
    with pytest.raises(FusionError, match="preset: 'gatys' is not one of default, paper"):
        capture_settings(*given, preset="gatys")


def test_optimize_paper_preset_sets_the_weights_left_at_their_defaults(
    fake_stylize, node_vgg, content_image, style_image
):
    calls = fake_stylize(optimize)
    chain = loss_chain(style_image)  # the widgets' defaults: a1 20, a2 2.5e-5
    changed = loss_chain(style_image)
    changed[1] = replace(changed[1], weight=3e-4)  # as if the user had typed it into the widget
    for terms, preset, expected in (
        (chain, "default", (20.0, 2.5e-5)),
        (chain, "paper", (20.0, 1e-4)),
        (changed, "paper", (20.0, 3e-4)),
    ):
        run_node("FusionStyleFusedOptimize", **optimize_inputs(node_vgg, content_image, terms, preset=preset))
        assert tuple(term.weight for term in calls.styles[-1]) == expected, preset


def test_optimize_with_adam_and_tv(node_vgg, content_image, style_terms):
    vgg, content, terms = node_vgg, content_image, style_terms
    (lbfgs,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms))
    (adam,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, optimizer="adam"))
    (smooth,) = run_node(
        "FusionStyleFusedOptimize", **optimize_inputs(vgg, content, terms, optimizer="adam", tv_weight=1000.0)
    )
    assert adam.shape == smooth.shape == (1, 32, 32, 3) and not torch.equal(lbfgs, adam)
    assert adam.min() >= 0 and adam.max() <= 1

    def roughness(image):
        return (image[:, 1:] - image[:, :-1]).abs().mean() + (image[:, :, 1:] - image[:, :, :-1]).abs().mean()

    assert roughness(smooth) < roughness(adam)


@pytest.mark.parametrize("matcher", MATCHER_NAMES)
def test_optimize_with_each_matcher_is_the_library_call_with_it(node_vgg, content_image, style_image, matcher):
    # A style at twice the output's size and six iterations: enough style patches and searches for the two
    # matchers to pick different ones (on fewer they agree, and a node that dropped the input would pass).
    terms = loss_chain(style_image, style_scale=2.0)
    given = dict(rematch_every=2, iterations=6)
    (image,) = run_node(
        "FusionStyleFusedOptimize", **optimize_inputs(node_vgg, content_image, terms, matcher=matcher, **given)
    )
    expected = {
        name: library_result(node_vgg, content_image, style_image, style_scale=2.0, matcher=name, **given)
        for name in MATCHER_NAMES
    }
    torch.testing.assert_close(image, expected[matcher])
    assert (expected["fast"] - expected["exact"]).abs().max() > 1e-3


def test_optimize_bad_settings_are_clear_errors(node_vgg, content_image, style_terms):
    with pytest.raises(FusionError, match="size: at the coarsest level"):
        run_node("FusionStyleFusedOptimize", **optimize_inputs(node_vgg, content_image, style_terms, size=64, levels=6))
    vgg16 = random_vgg("vgg16", width=4)
    with pytest.raises(FusionError, match="content_layer asks for 'relu3_4', which the loaded VGG16 .* not have"):
        run_node(
            "FusionStyleFusedOptimize",
            **optimize_inputs(vgg16, content_image, style_terms, content_layer="relu3_4"),
        )


# --- ComfyUI's services, faked ---------------------------------------------------------------------------


def test_models_folder_extends_extra_model_paths(comfyui, tmp_path):
    fp = comfyui.folder_paths
    fp.add_model_folder_path("vgg", str(tmp_path / "shared_vgg"))  # from extra_model_paths.yaml
    comfy.register_models_folder()
    comfy.register_models_folder()  # ComfyUI may import the pack again: no duplicate entry
    default = os.path.join(fp.models_dir, "vgg")
    assert fp.get_folder_paths("vgg") == [str(tmp_path / "shared_vgg"), default]
    assert fp.folder_names_and_paths["vgg"][1] == {".safetensors", ".pth", ".pt"}

    write_tiny_vgg(Path(default) / "tiny.safetensors")
    (Path(default) / "readme.txt").write_text("not a model")
    (choices, _) = NODES["FusionStyleLoadVGG"].INPUT_TYPES()["required"]["weights"]
    assert choices == ["vgg19", "tiny.safetensors"]
    (vgg,) = run_node("FusionStyleLoadVGG", weights="tiny.safetensors", convention="auto", pooling="max")
    assert vgg.arch == "vgg16"
    assert comfy.models_dirs()[0] == str(tmp_path / "shared_vgg")  # where vgg19 would be downloaded


def test_optimize_uses_comfyui_device_progress_and_preview(comfyui, node_vgg, style_terms):
    contents = comfy_images(2, 32, 32)
    inputs = optimize_inputs(node_vgg, contents, style_terms, levels=2, iterations=optimize.PREVIEW_EVERY)
    (image,) = run_node("FusionStyleFusedOptimize", **inputs)
    assert image.shape == (2, 32, 32, 3)
    steps = 2 * optimize.PREVIEW_EVERY
    assert [value for value, _, _ in comfyui.updates] == list(range(1, 2 * steps + 1))
    assert {total for _, total, _ in comfyui.updates} == {2 * steps}
    previews = [(value, preview) for value, _, preview in comfyui.updates if preview is not None]
    assert [value for value, _ in previews] == [5, 10, 15, 20]  # the end of every level, every PREVIEW_EVERY
    for _, (fmt, picture, size) in previews:
        # Shown at the level's own size: ComfyUI fits the picture into size x size, enlarging a smaller one.
        assert fmt == "JPEG" and isinstance(picture, Image.Image) and size == max(picture.size)
    assert [previews[i][1][1].size for i in range(4)] == [(16, 16), (32, 32), (16, 16), (32, 32)]
    assert comfyui.calls == ["free_memory", "offload", "soft_empty_cache"]


def test_preview_keeps_the_run_size_and_is_capped_at_comfyui_preview_size(comfyui, node_vgg, style_terms):
    comfyui.modules["comfy.cli_args"].args.preview_size = 40
    contents = comfy_images(1, 48, 64)
    inputs = optimize_inputs(node_vgg, contents, style_terms, size=64, levels=2, iterations=optimize.PREVIEW_EVERY)
    run_node("FusionStyleFusedOptimize", **inputs)
    shown = []
    for _, _, (_, picture, size) in [u for u in comfyui.updates if u[2] is not None]:
        # What ComfyUI's server does with the tuple (server.py send_image: ImageOps.contain(image, (max, max))).
        shown.append(ImageOps.contain(picture, (size, size)).size)
    assert shown == [(32, 24), (40, 30)]  # level 1 as it is (32 x 24); level 2 (64 x 48) fitted into 40 px


def test_cancel_stops_within_one_iteration_and_the_next_run_works(
    comfyui, node_vgg, content_image, style_image, style_terms
):
    comfyui.interrupt_at = 2
    inputs = optimize_inputs(node_vgg, content_image, style_terms, iterations=50)
    with pytest.raises(comfyui.mm.InterruptProcessingException):
        run_node("FusionStyleFusedOptimize", **inputs)
    assert [value for value, _, _ in comfyui.updates] == [1, 2]
    assert not comfyui.interrupted  # ComfyUI's flag is cleared by its own exception
    assert comfyui.calls[-2:] == ["offload", "soft_empty_cache"]  # the model is put away after a cancel too

    comfyui.interrupt_at = None
    comfyui.updates.clear()
    (image,) = run_node("FusionStyleFusedOptimize", **{**inputs, "iterations": 3})
    assert len(comfyui.updates) == 3
    torch.testing.assert_close(image, library_result(node_vgg, content_image, style_image, iterations=3))


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


def test_rgba_and_grey_images_are_converted(node_vgg, style_terms):
    vgg, terms = node_vgg, style_terms
    rgb = comfy_images(1, 24, 32, seed=3)
    with torch.inference_mode():
        rgba = torch.cat([rgb, torch.rand(1, 24, 32, 1)], -1)
        grey = rgb[..., :1]
    (from_rgba,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, rgba, terms))
    (from_rgb,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, rgb, terms))
    assert torch.equal(from_rgba, from_rgb)  # the alpha channel is ignored
    (from_grey,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, grey, terms))
    (from_grey3,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, grey.expand(-1, -1, -1, 3), terms))
    assert torch.equal(from_grey, from_grey3)
    with pytest.raises(FusionError, match=r"content_image: expected a ComfyUI IMAGE .* got \(1, 24, 32, 2\)"):
        run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg, rgb[..., :2], terms))


VGG16_LAYERS = "Its layers: relu1_1, relu1_2, pool1, relu2_1"


@pytest.mark.parametrize(
    ("where", "global_layers", "local_layer", "content_layer"),
    [
        ("Fused Style Optimize: content_layer asks for 'relu4_4'", "relu1_2", "relu3_1", "relu4_4"),
        (
            r"Global Style Loss \(Gram\), style_losses\[0\]: layers asks for 'relu3_4'",
            "relu1_2,relu3_4",
            "relu3_1",
            "relu3_1",
        ),
        (r"Local Patch Loss \(MRF\), style_losses\[1\]: layer asks for 'relu5_4'", "relu1_2", "relu5_4", "relu3_1"),
    ],
)
def test_layers_the_loaded_vgg16_lacks_are_named_before_the_run(
    fake_stylize, comfyui, content_image, style_image, where, global_layers, local_layer, content_layer
):
    vgg16 = random_vgg("vgg16", width=4)
    (terms,) = run_node(
        "FusionStyleGlobalStyleLoss", style_image=style_image, weight=1.0, layers=global_layers, style_scale=1.0
    )
    (terms,) = run_node(
        "FusionStyleLocalPatchLoss",
        style_image=style_image,
        weight=1e-4,
        layer=local_layer,
        patch_size=3,
        stride=1,
        style_scale=1.0,
        style_losses=terms,
    )
    calls = fake_stylize(optimize)
    inputs = optimize_inputs(vgg16, content_image, terms, content_layer=content_layer)
    with pytest.raises(FusionError, match=where + r", which the loaded VGG16 \(from Load VGG\) does not have") as error:
        run_node("FusionStyleFusedOptimize", **inputs)
    assert VGG16_LAYERS in str(error.value) and "relu5_3" in str(error.value)
    assert not any(layer in str(error.value).split("Its layers:")[1] for layer in ("relu3_4", "relu4_4", "relu5_4"))
    assert calls == [] and comfyui.updates == [] and comfyui.calls == []  # nothing started: no memory, no progress


def test_a_vgg16_runs_with_layers_it_has_paper_preset_too(fake_stylize, content_image, style_image):
    vgg16 = random_vgg("vgg16", width=4)
    terms = loss_chain(style_image)  # relu1_2, relu2_2, relu3_3 and relu3_1: all in a VGG16
    calls = fake_stylize(optimize)
    run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg16, content_image, terms))
    run_node("FusionStyleFusedOptimize", **optimize_inputs(vgg16, content_image, terms, preset="paper"))
    assert len(calls) == 2  # the paper's relu4_2 is in a VGG16 as well


def test_a_failing_batch_item_is_named(node_vgg, style_terms):
    with torch.inference_mode():
        batch = comfy_images(3, 24, 32, seed=4).clone()
        batch[2, 0, 0, 0] = float("nan")
    with pytest.raises(FusionError, match=r"content_image\[2\] \(of a batch of 3\): content: the image contains NaN"):
        run_node("FusionStyleFusedOptimize", **optimize_inputs(node_vgg, batch, style_terms))
