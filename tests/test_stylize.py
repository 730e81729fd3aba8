"""The optimiser end to end on a tiny seeded network, and once on the trained VGG16."""

import importlib
from dataclasses import replace

import pytest
import torch
from helpers import IMAGES, SHARED_DATA, TRAINED_VGG16, smooth_image, tiny_vgg

import fusion_core.stylize as stylize_module
from fusion_core import Cancelled, FusionError, GlobalStyle, LocalStyle, Settings, lean_backward, load_image, load_vgg
from fusion_core import functional as Fn
from fusion_core.config import preset
from fusion_core.geometry import border_margin
from fusion_core.images import mirror_pad, resize
from fusion_core.losses import PatchLoss
from fusion_core.matching import nearest_patches
from fusion_core.stylize import carry_up, stylize
from fusion_core.targets import build_criterion, styles_at_level

FAST = dict(size=48, levels=2, iterations=6, final_iterations=0)


@pytest.fixture(scope="module")
def images():
    return smooth_image(40, 56, seed=1), smooth_image(64, 64, seed=2)


def fused(style):
    return [GlobalStyle(style), LocalStyle(style)]


def test_the_package_names_the_module_not_the_function():
    import fusion_core

    assert stylize_module is importlib.import_module("fusion_core.stylize") is fusion_core.stylize
    assert stylize_module.stylize is stylize and callable(stylize)


def test_an_iteration_reads_from_the_device_once(vgg, images, monkeypatch):
    # Every way Python reads a value out of a tensor (on a GPU, each one waits for the device), counted between
    # two progress reports: the loss terms, the finite check and L-BFGS's scalars travel together.
    content, style = images
    reads, per_iteration = [], []
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def record(progress):
        per_iteration.append((progress.level, progress.iteration, list(reads)))
        reads.clear()

    settings = Settings(**{**FAST, "iterations": 7}, matcher="fast")  # full searches and propagation rounds
    stylize(vgg, content, fused(style), settings, on_progress=record)
    # The first iteration of a level also builds its criterion (set-up, once per level).
    steady = [found for level, iteration, found in per_iteration if iteration > 1]
    assert len(steady) == 2 * 6 and all(found == ["tolist"] for found in steady), per_iteration


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
        Settings(final_iterations=0, size=48, levels=1, iterations=15),
        on_progress=lambda p: totals.append(p.losses["total"]),
    )
    assert len(totals) == 15
    assert totals[-1] < 0.5 * totals[0]
    assert min(totals[5:]) < min(totals[:5])


def test_same_seed_same_image_other_seed_other_image(vgg, images):
    content, style = images
    a = stylize(vgg, content, fused(style), Settings(**FAST, init="random", seed=7))
    b = stylize(vgg, content, fused(style), Settings(**FAST, init="random", seed=7))
    c = stylize(vgg, content, fused(style), Settings(**FAST, init="random", seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The default start is the recoloured content: no randomness, so the seed changes nothing.
    d = stylize(vgg, content, fused(style), Settings(**FAST, seed=7))
    assert torch.equal(d, stylize(vgg, content, fused(style), Settings(**FAST, seed=8)))


def test_progress_reports_every_iteration_with_terms_and_previews(vgg, images):
    content, style = images
    reports = []
    stylize(vgg, content, fused(style), Settings(**FAST, preview_every=4), on_progress=reports.append)
    assert [r.step for r in reports] == list(range(1, 13)) and reports[-1].steps == 12
    # The local term joins at the last level here (the style is far below LOCAL_MIN_STYLE_SIDE before it).
    assert {"global", "content", "tv", "total"} == set(reports[0].losses)
    assert {"global", "local", "content", "tv", "total"} == set(reports[-1].losses)
    total = reports[-1].losses
    assert total["total"] == pytest.approx(sum(v for k, v in total.items() if k != "total"), rel=1e-5)
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
    stylize(vgg, content, fused(style), Settings(final_iterations=0, size=32, levels=1, iterations=1))  # still usable


def test_runs_inside_inference_mode_with_inference_tensors(images):
    content, style = images
    with torch.inference_mode():
        vgg = tiny_vgg("vgg16", width=4)  # built in inference mode, as a ComfyUI loader node would
        out = stylize(
            vgg, content.clone(), fused(style.clone()), Settings(final_iterations=0, size=32, levels=1, iterations=2)
        )
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
    gram, conv = Fn._Gram.backward, lean_backward._FrozenConvReLU.backward

    def gram_backward(ctx, grad):
        events.append(("gram", ctx.saved_tensors[0].shape[-1]))  # positions of the layer
        return gram(ctx, grad)

    def conv_backward(ctx, grad):
        events.append(("conv", grad.shape[-2] * grad.shape[-1]))
        return conv(ctx, grad)

    monkeypatch.setattr(Fn._Gram, "backward", staticmethod(gram_backward))
    monkeypatch.setattr(lean_backward._FrozenConvReLU, "backward", staticmethod(conv_backward))
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
    assert "global" not in reports[-1].losses and "local" in reports[-1].losses


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(levels=5, size=48), "size: at the coarsest level it is 2x3 px, too small for relu4_2; use a larger size"),
        (dict(iterations=0), "iterations: expected a whole number >= 1"),
        (dict(init="noise"), "init: 'noise' is not one of recolored, content, random"),
        (dict(content_layer="relu9_9"), "unknown layer.*'relu9_9'.*valid: relu1_1"),
        (dict(content_weight=-1.0), "content_weight: expected a finite number >= 0"),
        (dict(mixed_precision="false"), "mixed_precision: expected True or False, got 'false'"),
        (dict(local_all_levels=1), "local_all_levels: expected True or False, got 1"),
        (dict(match_content=1.5), "match_content: expected a number from 0 to 1, got 1.5"),
        (dict(match_content=True), "match_content: expected a number from 0 to 1, got True"),
        (dict(match_metric="cosine"), "match_metric: 'cosine' is not one of distance, correlation"),
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
        stylize(vgg, content, [GlobalStyle(style, weight=0)], Settings(**FAST, content_weight=0, tv_weight=0))
    with pytest.raises(FusionError, match=r"styles\[0\]: expected GlobalStyle or LocalStyle"):
        stylize(vgg, content, ["starry_night.jpg"], Settings(**FAST))


def test_load_image_errors(tmp_path):
    with pytest.raises(FusionError, match="content: file not found"):
        load_image(tmp_path / "missing.png", "content")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(FusionError, match="style: fake.png is not a readable image"):
        load_image(tmp_path / "fake.png", "style")


# --- the trained network -----------------------------------------------------------------------


@SHARED_DATA
def test_end_to_end_with_the_trained_vgg16():
    vgg = load_vgg(TRAINED_VGG16)
    content = load_image(IMAGES / "chelsea.png")
    style = load_image(IMAGES / "starry_night.jpg")
    reports = []
    out = stylize(
        vgg,
        content,
        fused(style),
        Settings(final_iterations=0, size=96, levels=2, iterations=15),
        on_progress=reports.append,
    )
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
    settings = Settings(final_iterations=0, size=48, levels=1, iterations=3, init="content")
    a = stylize(vgg, transposed, fused(style), settings)
    b = stylize(vgg, transposed.contiguous(), fused(style), settings)
    assert torch.equal(a, b)


# --- the pyramid: what each level starts from and which terms it uses ---------------------------


def test_carry_up_adds_back_the_detail_the_smaller_level_could_not_hold():
    start = smooth_image(48, 64, seed=3) + 0.1 * torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    small = resize(start, (24, 32))
    # A level that changed nothing hands the next level the full-detail start, not a blurred enlargement.
    torch.testing.assert_close(carry_up(small, (48, 64), start), start, rtol=0, atol=1e-6)
    assert (resize(small, (48, 64)) - start).abs().max() > 0.05
    # What the level changed is enlarged and kept; without a start image (random init) plain enlargement.
    change = 0.2 * smooth_image(24, 32, seed=5)
    torch.testing.assert_close(
        carry_up(small + change, (48, 64), start), start + resize(change, (48, 64)), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(carry_up(small, (48, 64)), resize(small, (48, 64)))


def test_the_local_term_joins_at_levels_whose_style_image_is_large_enough():
    style = torch.rand(1, 3, 8, 8)
    terms = [GlobalStyle(style), LocalStyle(style), LocalStyle(style, scale=2.0)]
    settings = Settings(size=512, levels=3)
    kinds = {
        shape: [(type(t).__name__, t.scale) for t in styles_at_level(terms, settings, shape, last)]
        for shape, last in (((85, 128), False), ((171, 256), False), ((341, 512), True))
    }
    assert kinds[(85, 128)] == [("GlobalStyle", 1.0), ("LocalStyle", 2.0)]  # 128 px, or 256 px at scale 2
    assert kinds[(171, 256)] == kinds[(341, 512)] == [("GlobalStyle", 1.0), ("LocalStyle", 1.0), ("LocalStyle", 2.0)]
    # Always at the last level, however small; and on every level in the paper's set-up.
    small = Settings(size=64, levels=1)
    assert len(styles_at_level(terms, small, (48, 64), last=True)) == 3
    paper = preset("paper", size=512, levels=3)
    assert len(styles_at_level(terms, paper, (85, 128), last=False)) == 3


def test_the_paper_preset_sets_back_what_the_defaults_change():
    paper, default = preset("paper"), Settings()
    assert (paper.init, paper.tv_weight, paper.local_all_levels) == ("random", 0.0, True)
    assert paper.global_layers == ("relu1_2", "relu2_2", "relu3_3", "relu4_2")  # the paper's Gram layers
    assert paper.match_content == 0.0  # the nearest patches of the output alone
    assert (paper.match_metric, default.match_metric) == ("correlation", "distance")  # Li and Wand's, ours
    assert (default.init, default.local_all_levels, default.global_layers) == ("recolored", False, None)
    assert default.tv_weight > 0 and default.match_content > 0
    assert (paper.content_weight, paper.iterations, paper.final_iterations) == (20.0, 100, 0)  # a3, the schedule
    assert (paper.content_layer, default.content_layer) == ("relu3_1", "relu4_2")  # the paper's, Gatys et al.'s
    changed = ("init", "tv_weight", "local_all_levels", "global_layers", "match_content", "content_weight")
    changed += ("content_layer", "match_metric")
    changed += ("iterations", "final_iterations")
    same = {k for k in vars(default) if k not in changed}
    assert all(getattr(paper, k) == getattr(default, k) for k in same)
    assert preset("paper", init="content").init == "content"  # explicit changes win


def test_global_layers_replace_every_global_terms_layers(vgg, images, monkeypatch):
    content, style = images
    seen = []
    original = stylize_module.build_criterion
    monkeypatch.setattr(
        stylize_module,
        "build_criterion",
        lambda v, c, styles, *a, **kw: seen.append(styles) or original(v, c, styles, *a, **kw),
    )
    terms = [GlobalStyle(style, layers=("relu1_1",)), LocalStyle(style)]
    stylize(vgg, content, terms, Settings(**FAST, global_layers=("relu2_1", "relu3_1")))
    assert [t.layers for t in seen[-1] if isinstance(t, GlobalStyle)] == [("relu2_1", "relu3_1")]
    stylize(vgg, content, terms, Settings(**FAST))
    assert [t.layers for t in seen[-1] if isinstance(t, GlobalStyle)] == [("relu1_1",)]
    with pytest.raises(FusionError, match="global_layers: give a tuple of at least one layer, got 'relu1_1'"):
        stylize(vgg, content, terms, Settings(**FAST, global_layers="relu1_1"))
    with pytest.raises(FusionError, match="preset: 'gatys' is not one of default, paper"):
        preset("gatys")


def test_the_balance_of_the_terms_does_not_move_when_the_activations_are_scaled():
    # Scaling conv1_1's weight and bias and every later bias by k multiplies every activation by k (ReLU and
    # pooling are positively homogeneous), as the ~50x larger Caffe activations do. Every weighted term, and the
    # image gradient of the total, must stay as they were.
    content, style = smooth_image(40, 56, seed=1), smooth_image(64, 64, seed=2)
    plain = tiny_vgg("vgg16", width=4)
    scaled = tiny_vgg("vgg16", width=4)
    k = 50.0
    with torch.no_grad():
        for i, conv in enumerate(scaled.convs):
            conv.bias.mul_(k)
            if i == 0:
                conv.weight.mul_(k)
    mask = torch.linspace(0, 1, 56).expand(40, 56)  # a soft region, through the mirrored margin as stylize runs
    terms = [GlobalStyle(style, target_mask=mask), LocalStyle(style, target_mask=mask)]
    settings = Settings(tv_weight=10.0)
    values, gradients = [], []
    for network in (plain, scaled):
        criterion = build_criterion(network, content, terms, settings, (40, 56), margin=4)
        x = smooth_image(48, 64, seed=9).requires_grad_(True)  # not the content: every term is non-zero
        result = criterion(x, rematch=True)
        result["total"].backward()
        values.append({name: float(v.detach()) for name, v in result.items()})
        gradients.append(x.grad)
    assert set(values[0]) == {"global", "local", "content", "tv", "total"}
    for name in values[0]:
        assert values[1][name] == pytest.approx(values[0][name], rel=1e-4), name
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-3, atol=1e-6 * float(gradients[0].abs().max()))


def test_a_margin_scores_the_mirrored_canvas_with_the_content_and_masks_padded_alike(vgg, images):
    content, style = images
    shape, margin = (24, 32), 4
    mask = torch.zeros(shape)
    mask[:, 20:] = 1
    terms = [GlobalStyle(style, target_mask=mask), LocalStyle(style, target_mask=mask)]
    settings = Settings()
    with_margin = build_criterion(vgg, content, terms, settings, shape, margin=margin)
    # The same criterion built directly on the larger canvas: the content mirrored, the mask's edge values repeated,
    # the style at the picture's size (not the canvas's: scale 32 / 40).
    padded_mask = torch.nn.functional.pad(mask[None, None], (margin,) * 4, mode="replicate")[0, 0]
    direct = build_criterion(
        vgg,
        mirror_pad(resize(content, shape), margin),
        [replace(t, target_mask=padded_mask, scale=0.8) for t in terms],
        settings,
        (shape[0] + 2 * margin, shape[1] + 2 * margin),
    )
    x = mirror_pad(smooth_image(*shape, seed=9), margin)
    a, b = with_margin(x, rematch=True), direct(x, rematch=True)
    assert set(a) == set(b) == {"global", "local", "content", "tv", "total"}
    for name in a:
        assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-6), name
    assert border_margin((341, 512)) == 8 and border_margin((24, 32)) == 4


# --- the patch search guided by the content ------------------------------------------------------


@pytest.mark.parametrize("matcher", ["exact", "fast"])
@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_the_patch_search_looks_for_the_blend_of_output_and_content(matcher, share):
    """With a guide, the matches are the search's own for (1 - share) * output + share * content: the exact search's
    against a direct search of the blend, the fast search's against the same search run on the blend itself."""
    generator = torch.Generator().manual_seed(4)
    style, output, content = (torch.rand(1, 6, h, w, generator=generator) for h, w in ((14, 15), (11, 12), (11, 12)))
    guided = PatchLoss("relu3_1", style, matcher=matcher, guide=content, guide_share=share)
    plain = PatchLoss("relu3_1", style, matcher=matcher)
    blend = (1 - share) * output + share * content
    guided.match({"relu3_1": output})
    plain.match({"relu3_1": blend})
    assert torch.equal(guided.indices, plain.indices)
    if matcher == "exact":
        assert torch.equal(guided.indices, nearest_patches(blend, style, 3, 1))
    # the pull is toward the matched style patches from the output itself, whatever the search looked at
    pulled = guided({"relu3_1": output})
    assert torch.allclose(pulled, plain({"relu3_1": output}))


def test_the_guide_is_the_content_target_when_both_use_one_layer(vgg, images):
    """The content term's target map serves as the patch search's guide: no second map of the content."""
    content, style = images
    settings = Settings(size=56, levels=1, content_layer="relu3_1", match_content=0.5)
    criterion = build_criterion(vgg, content, fused(style), settings, (40, 56))
    (patch,) = [module for kind, _, module in criterion.terms if kind == "local"]
    (content_term,) = [module for kind, _, module in criterion.terms if kind == "content"]
    assert patch.guide.data_ptr() == content_term.target.data_ptr()  # one map, shared
    paper = build_criterion(vgg, content, fused(style), replace(settings, match_content=0.0), (40, 56))
    assert [module for kind, _, module in paper.terms if kind == "local"][0].guide is None
    other = build_criterion(vgg, content, fused(style), replace(settings, content_layer="relu4_1"), (40, 56))
    guide = [module for kind, _, module in other.terms if kind == "local"][0].guide
    assert torch.equal(guide, vgg(content, ["relu3_1"])["relu3_1"])  # computed for its own layer


def test_a_guide_share_needs_a_guide():
    with pytest.raises(ValueError, match="guide_share > 0 needs a guide map"):
        PatchLoss("relu3_1", torch.rand(1, 2, 5, 5), guide_share=0.5)
