"""The optimiser end to end on a tiny seeded network, and once on the trained VGG16."""

import pytest
import torch
from helpers import IMAGES, TRAINED_VGG16, smooth_image, tiny_vgg

from fusion_core import Cancelled, FusionError, GlobalStyle, LocalStyle, Settings, load_image, load_vgg, stylize
from fusion_core import functional as Fn
from fusion_core import vgg as vgg_module
from fusion_core.images import resize
from fusion_core.stylize import build_criterion

FAST = dict(size=48, levels=2, iterations=6)


@pytest.fixture(scope="module")
def vgg():
    return tiny_vgg("vgg19", width=4)


@pytest.fixture(scope="module")
def images():
    return smooth_image(40, 56, seed=1), smooth_image(64, 64, seed=2)


def fused(style):
    return [GlobalStyle(style), LocalStyle(style)]


def test_output_shape_keeps_the_content_aspect_ratio(vgg, images):
    content, style = images
    out = stylize(vgg, content, fused(style), Settings(**FAST))
    assert out.shape == (1, 3, 34, 48)
    assert out.min() >= 0 and out.max() <= 1


def test_total_loss_decreases(vgg, images):
    content, style = images
    totals = []
    stylize(
        vgg,
        content,
        fused(style),
        Settings(size=48, levels=1, iterations=15),
        on_progress=lambda p: totals.append(p.losses["total"]),
    )
    assert len(totals) == 15
    assert totals[-1] < 0.5 * totals[0]
    assert min(totals[5:]) < min(totals[:5])


def test_same_seed_same_image_other_seed_other_image(vgg, images):
    content, style = images
    a = stylize(vgg, content, fused(style), Settings(**FAST, seed=7))
    b = stylize(vgg, content, fused(style), Settings(**FAST, seed=7))
    c = stylize(vgg, content, fused(style), Settings(**FAST, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_progress_reports_every_iteration_with_terms_and_previews(vgg, images):
    content, style = images
    reports = []
    stylize(vgg, content, fused(style), Settings(**FAST, preview_every=4), on_progress=reports.append)
    assert [r.step for r in reports] == list(range(1, 13)) and reports[-1].steps == 12
    assert {"global", "local", "content", "total"} <= set(reports[0].losses)
    total = reports[0].losses
    assert total["total"] == pytest.approx(total["global"] + total["local"] + total["content"], rel=1e-5)
    previews = [r.iteration for r in reports if r.image is not None]
    assert previews == [4, 6, 4, 6]  # every 4th and each level's last
    assert reports[-1].image.shape == (1, 3, 34, 48)


def test_should_stop_cancels_before_the_next_iteration(vgg, images):
    content, style = images
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    done = []
    with pytest.raises(Cancelled):
        stylize(vgg, content, fused(style), Settings(**FAST), on_progress=done.append, should_stop=stop_after_three)
    assert len(done) == 3
    stylize(vgg, content, fused(style), Settings(size=32, levels=1, iterations=1))  # still usable


def test_runs_inside_inference_mode_with_inference_tensors(images):
    content, style = images
    with torch.inference_mode():
        vgg = tiny_vgg("vgg16", width=4)  # built in inference mode, as a ComfyUI loader node would
        out = stylize(vgg, content.clone(), fused(style.clone()), Settings(size=32, levels=1, iterations=2))
    assert out.shape[-1] == 32


def test_weighted_terms_are_the_unweighted_modules_times_the_weights(vgg, images):
    content, style = images
    settings = Settings(size=48, content_weight=3.0)
    shape = (34, 48)
    one = build_criterion(
        vgg,
        content,
        [GlobalStyle(style, weight=1), LocalStyle(style, weight=1)],
        Settings(size=48, content_weight=1.0),
        shape,
    )
    many = build_criterion(vgg, content, [GlobalStyle(style, weight=5), LocalStyle(style, weight=7)], settings, shape)
    x = resize(content, shape)
    a, b = one(x, rematch=True), many(x, rematch=True)
    for kind, factor in (("global", 5), ("local", 7), ("content", 3)):
        torch.testing.assert_close(b[kind], factor * a[kind])


def test_terms_equal_the_modules_on_the_whole_pass(vgg, images):
    # The criterion evaluates each term while the VGG pass runs; the sum is that of the plain formula.
    content, style = images
    shape = (34, 48)
    criterion = build_criterion(vgg, content, fused(style), Settings(size=48), shape)
    x = resize(content, shape)
    values = criterion(x, rematch=True)
    features = vgg(x, criterion.layers)
    for kind in ("global", "local", "content"):
        expected = sum(w * module(features) for k, w, module in criterion.terms if k == kind)
        torch.testing.assert_close(values[kind], expected)
    globals_ = [module for kind, _, module in criterion.terms if kind == "global"]
    assert sorted(layer for module in globals_ for layer in module.layers) == sorted(GlobalStyle(style).layers)


def test_a_shallow_term_gets_its_gradient_after_the_deeper_layers(vgg, images, monkeypatch):
    # So the backward pass does not hold a full-resolution loss gradient while it works through the
    # deeper layers: the Gram of relu1_2 is differentiated after every conv below block 1.
    content, style = images
    criterion = build_criterion(vgg, content, [GlobalStyle(style)], Settings(size=48, content_weight=0), (32, 48))
    events = []
    gram, conv = Fn._Gram.backward, vgg_module._FrozenConvReLU.backward

    def gram_backward(ctx, grad):
        events.append(("gram", ctx.saved_tensors[0].shape[-1]))  # positions of the layer
        return gram(ctx, grad)

    def conv_backward(ctx, grad):
        events.append(("conv", grad.shape[-2] * grad.shape[-1]))
        return conv(ctx, grad)

    monkeypatch.setattr(Fn._Gram, "backward", staticmethod(gram_backward))
    monkeypatch.setattr(vgg_module._FrozenConvReLU, "backward", staticmethod(conv_backward))
    criterion(resize(content, (32, 48)).requires_grad_(True), rematch=True)["total"].backward()
    full = 32 * 48
    first_gram = events.index(("gram", full))
    deeper_convs = [i for i, (kind, positions) in enumerate(events) if kind == "conv" and positions < full]
    assert deeper_convs and max(deeper_convs) < first_gram


def test_zero_weight_terms_are_left_out(vgg, images):
    content, style = images
    reports = []
    stylize(
        vgg, content, [GlobalStyle(style, weight=0), LocalStyle(style)], Settings(**FAST), on_progress=reports.append
    )
    assert "global" not in reports[0].losses and "local" in reports[0].losses


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(levels=5, size=48), "size: at the coarsest level it is 2x3 px, too small for relu3_1; use a larger size"),
        (dict(iterations=0), "iterations: expected a whole number >= 1"),
        (dict(init="noise"), "init: 'noise' is not one of random, content"),
        (dict(content_layer="relu9_9"), "unknown layer.*'relu9_9'.*valid: relu1_1"),
        (dict(content_weight=-1.0), "content_weight: expected a finite number >= 0"),
        (dict(mixed_precision="false"), "mixed_precision: expected True or False, got 'false'"),
    ],
)
def test_bad_settings(vgg, images, change, message):
    content, style = images
    with pytest.raises(FusionError, match=message):
        stylize(vgg, content, fused(style), Settings(**{**FAST, **change}))


def test_bad_images(vgg, images):
    content, style = images
    with pytest.raises(FusionError, match=r"content: expected one RGB image .* got shape \(1, 4, 40, 56\)"):
        stylize(vgg, torch.rand(1, 4, 40, 56), fused(style), Settings(**FAST))
    with pytest.raises(FusionError, match=r"styles\[0\].image: expected one RGB image .* \(1, 1, 64, 64\)"):
        stylize(vgg, content, fused(torch.rand(1, 1, 64, 64)), Settings(**FAST))
    nan = content.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(FusionError, match="content: the image contains NaN"):
        stylize(vgg, nan, fused(style), Settings(**FAST))
    with pytest.raises(
        FusionError,
        match=r"styles\[1\].image: at the coarsest level it is 24x3 px, too small for relu3_1 with 3x3 patches",
    ):
        stylize(vgg, content, [GlobalStyle(style), LocalStyle(torch.rand(1, 3, 60, 8))], Settings(**FAST))


def test_bad_style_terms(vgg, images):
    content, style = images
    with pytest.raises(FusionError, match=r"styles\[1\].weight: expected a finite number >= 0"):
        stylize(vgg, content, [GlobalStyle(style), LocalStyle(style, weight=-1)], Settings(**FAST))
    with pytest.raises(FusionError, match=r"unknown layer.*'relu3_9'"):
        stylize(vgg, content, [GlobalStyle(style, layers=("relu1_1", "relu3_9"))], Settings(**FAST))
    with pytest.raises(FusionError, match="all loss weights are zero"):
        stylize(vgg, content, [GlobalStyle(style, weight=0)], Settings(**FAST, content_weight=0))
    with pytest.raises(FusionError, match=r"styles\[0\]: expected GlobalStyle or LocalStyle"):
        stylize(vgg, content, ["starry_night.jpg"], Settings(**FAST))


def test_load_image_errors(tmp_path):
    with pytest.raises(FusionError, match="content: file not found"):
        load_image(tmp_path / "missing.png", "content")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(FusionError, match="style: fake.png is not a readable image"):
        load_image(tmp_path / "fake.png", "style")


# --- the trained network -----------------------------------------------------------------------


@pytest.mark.skipif(not TRAINED_VGG16.is_file(), reason=f"trained VGG16 not found at {TRAINED_VGG16}")
def test_end_to_end_with_the_trained_vgg16():
    vgg = load_vgg(TRAINED_VGG16)
    content = load_image(IMAGES / "chelsea.png")
    style = load_image(IMAGES / "starry_night.jpg")
    reports = []
    out = stylize(vgg, content, fused(style), Settings(size=96, levels=2, iterations=15), on_progress=reports.append)
    assert out.shape == (1, 3, 64, 96)
    level_two = [r.losses["total"] for r in reports if r.level == 2]
    assert level_two[-1] < level_two[0]
    # The output takes the style's colours: its mean colour is closer to the style's than the content's.
    style_mean, content_mean = style.mean((2, 3)), content.mean((2, 3))
    out_mean = out.mean((2, 3))
    assert (out_mean - style_mean).norm() < (out_mean - content_mean).norm()


def test_non_contiguous_inputs_work(vgg, images):
    _, style = images
    transposed = smooth_image(48, 34, seed=4).transpose(-1, -2)  # (1, 3, 34, 48): already the output size
    assert not transposed.is_contiguous()
    settings = Settings(size=48, levels=1, iterations=3, init="content")
    a = stylize(vgg, transposed, fused(style), settings)
    b = stylize(vgg, transposed.contiguous(), fused(style), settings)
    assert torch.equal(a, b)
