"""The tiled evaluation (tiling.py) against the untiled one, and the memory plan that chooses it.

Tolerance. Tiled and untiled runs compute the same sums in a different order (per tile, then added), and the
convolution library may block a crop differently from the whole image; both differ in float32 rounding only. So
gradients are compared with a tolerance of 1e-5 of the gradient's largest entry (float32's epsilon is 1.2e-7; the
observed differences are ~5e-7) and loss values with a relative 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from helpers import smooth_image, tiny_vgg

from fusion_core import FusionError, GlobalStyle, LocalStyle, Settings, memory, tiling
from fusion_core.functional import gram_matrix, gram_part, gram_part_grad
from fusion_core.geometry import feature_shape, layer_reach
from fusion_core.memory import MIN_TILE, estimate_bytes, plan_level, split_candidates, tiled_bytes
from fusion_core.stylize import stylize
from fusion_core.targets import build_criterion
from fusion_core.tiles import TilePlan
from fusion_core.tiling import TiledCriterion, tiled_maps

GRADIENT_TOLERANCE = 1e-5  # of the largest gradient entry (module docstring)
VALUE_TOLERANCE = 1e-5  # relative
SHALLOW = ("relu1_1", "relu2_1", "relu3_1")  # Gram layers with a small receptive field: many tiles on small images


def shallow_settings(**fields) -> Settings:
    """Settings with the content term on the local term's shallow layer: the tiles and images here are sized for
    shallow layers' receptive fields (the default content layer, relu4_2, has a far larger one)."""
    return Settings(content_layer="relu3_1", **fields)


@pytest.fixture(scope="module")
def net():
    return tiny_vgg("vgg19", width=4)


def _half_mask(shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(shape)
    mask[:, shape[1] // 3 :] = 1.0
    mask[: shape[0] // 4] = 0.5  # soft values too
    return mask


def _terms(kind: str, style: torch.Tensor, mask: torch.Tensor | None, layers=SHALLOW, stride: int = 1):
    global_style = GlobalStyle(style, layers=layers, target_mask=mask)
    local_style = LocalStyle(style, target_mask=mask, stride=stride)
    return {"global": [global_style], "local": [local_style], "content": [], "all": [global_style, local_style]}[kind]


def _both(net, content, terms, settings, shape, tile, margin=0, split=None):
    whole = build_criterion(net, content, terms, settings, shape, margin=margin)
    tiled = build_criterion(net, content, terms, settings, shape, margin=margin, tile=tile)
    canvas = (shape[0] + 2 * margin, shape[1] + 2 * margin)
    return whole, TiledCriterion(tiled, canvas, tile, split)


@pytest.fixture
def every_layer_in_tiles(monkeypatch):
    """Plans without a split: every layer in tiles (the scheme for the largest sizes)."""
    monkeypatch.setattr(memory, "split_candidates", lambda vgg, layers: [])


def _compare(whole, tiled, image, iterations: int = 3):
    """Evaluate both on the same images (moving the image between evaluations, so the matches change); returns the
    largest relative gradient and value differences."""
    worst_gradient = worst_value = 0.0
    for _ in range(iterations):
        expected = whole.evaluate(image, rematch=True)
        expected_grad = image.grad.clone()
        found = tiled.evaluate(image, rematch=True)
        assert list(found) == list(expected)  # the same terms, in the same order
        scale = expected_grad.abs().max()
        worst_gradient = max(worst_gradient, float((image.grad - expected_grad).abs().max() / scale))
        for name in expected:
            difference = abs(float(found[name] - expected[name])) / max(abs(float(expected[name])), 1e-12)
            worst_value = max(worst_value, difference)
        with torch.no_grad():
            image -= 0.02 * expected_grad.sign()
    return worst_gradient, worst_value


def test_layer_reach_is_the_receptive_field_found_by_perturbing_one_pixel(net):
    """Every position a changed pixel moves lies in the reach, and the reach's ends are attained."""
    image = smooth_image(64, 64, seed=1)
    for layer in ("relu1_2", "relu2_1", "pool2", "relu3_1", "relu4_1"):
        reach = layer_reach(net.names, layer)
        base = net(image, [layer])[layer]
        for y in (30, 31):
            changed = image.clone()
            changed[..., y, :] += 0.5
            moved = (net(changed, [layer])[layer] - base).abs().amax((0, 1, 3)) > 0
            rows = moved.nonzero()[:, 0]
            lowest, highest = int(rows.min()), int(rows.max())
            # position p sees pixels p * stride - before .. p * stride + after
            assert all(p * reach.stride - reach.before <= y <= p * reach.stride + reach.after for p in rows.tolist())
            attained_before = (highest * reach.stride - reach.before) in range(y - reach.stride + 1, y + 1)
            attained_after = (lowest * reach.stride + reach.after) in range(y, y + reach.stride)
            assert attained_before or attained_after


def test_tiles_cover_every_position_of_every_layer_once(net):
    extra = dict.fromkeys(["relu1_1", "relu2_1", "relu3_1", "pool3"], (0, 0))
    plan = TilePlan(net.names, (91, 77), extra, 60)
    assert len(plan.tiles) > 4
    for layer in extra:
        count = torch.zeros(feature_shape((91, 77), layer), dtype=torch.long)
        for tile in plan.tiles:
            rows, cols = plan.owned(tile, layer)
            count[rows.start : rows.stop, cols.start : cols.stop] += 1
            assert tile.crop[0].start % plan.align == 0 and tile.crop[1].start % plan.align == 0
            assert tile.crop[0].stop - tile.crop[0].start <= 60 and tile.crop[1].stop - tile.crop[1].start <= 60
        assert (count == 1).all()


def _even_split(plan: TilePlan, length: int, tile: int) -> int:
    """The fewest blocks for cutting ``length`` px evenly (edges rounded to the stride) with crops of at most ``tile``
    px, each crop its block and its halo: a second way to split, against which the plan's is checked."""
    for count in range(1, length // plan.align + 2):
        cuts = sorted({0, length, *(round(k * length / count / plan.align) * plan.align for k in range(1, count))})
        crops = [
            min(length, b + plan.after) - max(0, a - plan.before) for a, b in zip(cuts, cuts[1:], strict=False) if b > a
        ]
        if max(crops) <= tile:
            return len(crops)
    raise AssertionError("no even split fits")


@pytest.mark.parametrize("length", [61, 200, 333, 512, 777])
@pytest.mark.parametrize("tile", [60, 100, 128])
def test_no_crop_is_larger_than_the_first_and_the_split_costs_no_more_than_an_even_one(net, length, tile):
    """Every crop but the last has the first's size and the last is no larger, so the blocks a tile's pass frees
    hold the next tile's (the allocator reuses them instead of growing); each crop covers its block and the halo;
    no more tiles than an even split, and the crops' total length at most what blocks plus halos need, give or take
    the stride per crop."""
    plan = TilePlan(net.names, (length, 16), {"relu1_1": (0, 0), "relu3_1": (1, 3), "pool3": (0, 0)}, tile)
    split = [(t.block[0], t.crop[0]) for t in plan.tiles]
    widths = [crop.stop - crop.start for _, crop in split]
    assert all(width == widths[0] for width in widths[:-1]) and widths[-1] <= widths[0] <= tile
    for block, crop in split:
        assert crop.start % plan.align == 0 and block.start % plan.align == 0
        assert crop.start <= max(0, block.start - plan.before) and crop.stop >= min(length, block.stop + plan.after)
    assert [b.start for b, _ in split[1:]] == [b.stop for b, _ in split[:-1]] and split[-1][0].stop == length
    assert len(split) <= _even_split(plan, length, tile)
    halos = (len(split) - 1) * (plan.before + plan.after)
    assert sum(widths) <= length + halos + len(split) * plan.align


def test_a_tile_too_small_for_the_receptive_field_is_refused_with_the_smallest_that_works(net):
    with pytest.raises(FusionError, match=r"tile: 32 px is too small for the layers in use; give at least \d+ px"):
        TilePlan(net.names, (200, 200), {"relu5_1": (0, 0)}, 32)


def test_the_pass_from_a_pooling_layer_on_gives_the_whole_pass(net):
    image = smooth_image(61, 77, seed=1)
    whole = net(image, ["pool2", "relu3_1", "relu4_1"])
    for name, found in net(whole["pool2"], ["relu3_1", "relu4_1"], after="pool2").items():
        assert (found - whole[name]).abs().max() <= 1e-6 * whole[name].abs().max()
    with pytest.raises(FusionError, match="after: 'relu3_1' must be a ReLU or pooling layer before every layer"):
        net(whole["relu3_1"], ["relu2_1"], after="relu3_1")


@pytest.mark.parametrize("kind", ["global", "local", "content", "all"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("split", [None, "pool1", "pool2"])
def test_tiled_gradient_equals_the_untiled_one(net, kind, masked, split):
    """Every layer in tiles, or the deep layers whole after a split: with pool1 the patch and content terms are
    whole and a Gram layer on each side; with pool2 only the deepest layer is whole."""
    shape = (61, 77)  # odd sizes: the pools drop a row and a column
    content, style = smooth_image(*shape, seed=2), smooth_image(54, 83, seed=3)
    terms = _terms(kind, style, _half_mask(shape) if masked else None)
    settings = shallow_settings(size=77, levels=1, mixed_precision=False, matcher="exact", tv_weight=1.0)
    whole, tiled = _both(net, content, terms, settings, shape, tile=50 if split is None else 30, split=split)
    assert tiled.tiles >= 4
    image = smooth_image(*shape, seed=4).requires_grad_(True)
    gradient, value = _compare(whole, tiled, image)
    assert gradient < GRADIENT_TOLERANCE
    assert value < VALUE_TOLERANCE


@pytest.mark.parametrize("split", [None, "pool3"])
def test_tiled_gradient_with_the_default_layers_a_margin_and_a_patch_stride(net, split):
    """The Gram loss on the default layers (relu5_1: 16 px stride, ~160 px receptive field), the patch loss with
    stride 2, the mirrored margin a level is optimised with; with a split after pool3, the patch and content terms
    in the tiles and the two deepest Gram layers whole."""
    shape = (230, 250)
    content, style = smooth_image(*shape, seed=5), smooth_image(200, 240, seed=6)
    terms = [GlobalStyle(style, target_mask=_half_mask(shape)), LocalStyle(style, stride=2)]
    settings = shallow_settings(size=250, levels=1, mixed_precision=False, matcher="exact")
    tile = 220 if split is None else 180
    whole, tiled = _both(net, content, terms, settings, shape, tile=tile, margin=4, split=split)
    assert tiled.tiles >= 4
    image = smooth_image(238, 258, seed=7).requires_grad_(True)
    gradient, value = _compare(whole, tiled, image, iterations=2)
    assert gradient < GRADIENT_TOLERANCE
    assert value < VALUE_TOLERANCE


def test_tiled_fast_search_finds_the_untiled_matches(net):
    """The fast search's full search is per patch; its propagation looks at the neighbours' previous matches (a
    ring of patches around each tile) and at random patches, drawn differently in tiles: the matches may differ
    where a random candidate won, nowhere else."""
    shape = (61, 77)
    content, style = smooth_image(*shape, seed=2), smooth_image(54, 83, seed=3)
    settings = shallow_settings(size=77, levels=1, mixed_precision=False, matcher="fast")
    whole, tiled = _both(net, content, [LocalStyle(style)], settings, shape, tile=50)
    image = smooth_image(*shape, seed=4).requires_grad_(True)
    agreement = []
    for _ in range(6):  # two full searches and four propagations
        whole.evaluate(image, rematch=True)
        grad = image.grad.clone()
        tiled.evaluate(image, rematch=True)
        agreement.append(float((whole.terms[0][2].indices == tiled.criterion.terms[0][2].indices).float().mean()))
        with torch.no_grad():
            image -= 0.05 * grad.sign()
    assert agreement[0] == 1.0 and agreement[3] == 1.0  # the full searches
    assert min(agreement) > 0.97


def test_tiled_maps_and_grams_equal_the_whole_image_ones(net):
    image = smooth_image(97, 83, seed=8)
    mask = _half_mask((24, 20))  # relu3_1's shape for this image
    maps, grams = tiled_maps(net, image, 48, ["relu3_1", "relu1_2"], {"relu2_1": None, "relu3_1": mask})
    whole = net(image, ["relu3_1", "relu1_2", "relu2_1"])
    pairs = [(maps["relu3_1"], whole["relu3_1"]), (maps["relu1_2"], whole["relu1_2"])]
    pairs += [
        (grams["relu2_1"], gram_matrix(whole["relu2_1"])),
        (grams["relu3_1"], gram_matrix(whole["relu3_1"], mask)),
    ]
    for found, expected in pairs:
        assert found.shape == expected.shape
        assert (found - expected).abs().max() <= VALUE_TOLERANCE * expected.abs().max()


def _run(net, tile: int, matcher: str, nudge: float = 0.0) -> torch.Tensor:
    content, style = smooth_image(70, 90, seed=9), smooth_image(80, 80, seed=10)
    content = content + nudge * torch.randn(content.shape, generator=torch.Generator().manual_seed(1))
    terms = [GlobalStyle(style, layers=SHALLOW), LocalStyle(style)]
    settings = shallow_settings(
        final_iterations=0,
        size=90,
        levels=2,
        iterations=6,
        matcher=matcher,
        mixed_precision=False,
        tile=tile,
    )
    return stylize(net, content, terms, settings)


@pytest.mark.parametrize("matcher", ["exact", "fast"])
@pytest.mark.parametrize("split", ["planned", "none"])
def test_a_tiled_run_gives_the_untiled_image(net, matcher, split, monkeypatch):
    """Twelve L-BFGS steps amplify rounding: a rounding-sized change can flip a near-tied patch match, which moves
    a few pixels by a grey level or so. So the tiled run is held to what a 1e-6 change of the content does to the
    untiled run, and to an average difference far below a grey level (1/255 = 4e-3). (The fast search's random
    candidates are drawn differently in tiles; here they find the same matches.) The plan splits after pool1
    (plenty of memory: the shallowest split); "none" runs every layer in tiles."""
    untiled = _run(net, 0, matcher)
    if split == "none":
        monkeypatch.setattr(memory, "split_candidates", lambda vgg, layers: [])
    tiled = _run(net, 56, matcher)
    nudged = _run(net, 0, matcher, nudge=1e-6)
    difference, rounding = (tiled - untiled).abs(), (nudged - untiled).abs()
    assert difference.mean() < 1e-4
    assert difference.mean() <= 3 * rounding.mean() + 1e-6
    assert difference.max() <= 3 * rounding.max() + 1e-5


def _seam_ratio(difference: torch.Tensor, plan: TilePlan, band: int = 2) -> float:
    """Mean |difference| within ``band`` px of a block edge, over the mean elsewhere."""
    near = torch.zeros(difference.shape[-2:], dtype=torch.bool)
    for tile in plan.tiles:
        for axis, block in enumerate(tile.block):
            for edge in (block.start, block.stop):
                if 0 < edge < difference.shape[-2 + axis]:
                    index = [slice(None), slice(None)]
                    index[axis] = slice(max(0, edge - band), edge + band)
                    near[tuple(index)] = True
    per_pixel = difference.abs().sum(1)[0]
    return float(per_pixel[near].mean() / per_pixel[~near].mean().clamp_min(1e-12))


def test_no_seam_the_tiled_result_differs_no_more_at_tile_edges(net, every_layer_in_tiles):
    """The tiled run's difference from the untiled one shows no grid: it is no larger along the tiles' edges than
    elsewhere, in the gradient and in the image after a run. The measure itself finds a planted seam."""
    shape = (150, 190)  # blocks several times the width of the band measured along their edges
    content, style = smooth_image(*shape, seed=2), smooth_image(120, 140, seed=3)
    settings = shallow_settings(size=190, levels=1, mixed_precision=False, matcher="exact")
    whole, tiled = _both(net, content, _terms("all", style, None), settings, shape, tile=100)
    assert tiled.tiles >= 4
    image = smooth_image(*shape, seed=4).requires_grad_(True)
    whole.evaluate(image, rematch=True)
    expected = image.grad.clone()
    tiled.evaluate(image, rematch=True)
    assert _seam_ratio(image.grad - expected, tiled.plan) < 2.0

    untiled_run, tiled_run = _run(net, 0, "exact"), _run(net, 56, "exact")
    plan = TilePlan(net.names, (78, 98), dict.fromkeys(SHALLOW, (0, 0)) | {"relu3_1": (1, 3)}, 56)
    margin = 4  # the run's canvas has a 4 px mirrored margin; its blocks' edges, in the output's coordinates:
    shifted = [type(t)(tuple(range(r.start - margin, r.stop - margin) for r in t.block), t.crop) for t in plan.tiles]
    plan.tiles = shifted
    assert len(plan.tiles) >= 4
    assert _seam_ratio(tiled_run - untiled_run, plan) < 2.0

    planted = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0)) * 1e-6
    seam = tiled.plan.tiles[0].block[0].stop
    planted[..., seam - 1 : seam + 1, :] += 1e-4
    assert _seam_ratio(planted, tiled.plan) > 10.0


def test_the_plan_is_whole_where_it_fits_and_tiled_where_not(style):
    vgg = tiny_vgg("vgg19", width=64)  # real widths: the estimate depends on them
    styles = [GlobalStyle(style), LocalStyle(style)]
    settings = Settings(size=2048)
    canvas = (2112, 2112)
    whole = estimate_bytes(vgg, canvas, styles, settings)
    assert plan_level(vgg, canvas, styles, settings, available=int(whole / 0.85)).tile == 0
    budget = whole / 3
    plan = plan_level(vgg, canvas, styles, settings, available=int(budget / 0.9))
    assert plan.tile > 0 and plan.history >= 5 and plan.split is not None
    assert tiled_bytes(vgg, canvas, styles, settings, plan.tile, plan.history, plan.split) <= budget
    # the fastest choice that fits: the shallowest split; each shallower one does not fit even in the smallest tiles
    splits = split_candidates(vgg, set(GlobalStyle(style).layers) | {"relu3_1"})
    assert splits.index(plan.split) > 0
    for shallower in splits[: splits.index(plan.split)]:
        assert tiled_bytes(vgg, canvas, styles, settings, MIN_TILE, 5, shallower) > budget
    # where no split fits, every layer runs in tiles
    least = min(tiled_bytes(vgg, canvas, styles, settings, MIN_TILE, 5, split) for split in splits)
    fitting = plan_level(vgg, canvas, styles, settings, available=int(least / 0.9) - 64)
    assert fitting.split is None and fitting.history >= 5
    # a tile asked for is used, with as long a history as fits next to it
    forced = plan_level(vgg, canvas, styles, Settings(size=2048, tile=768), available=int(whole))
    assert forced.tile == 768 and forced.history == settings.history_size
    tight = tiled_bytes(vgg, canvas, styles, settings, 768, 3)
    assert all(tiled_bytes(vgg, canvas, styles, settings, 768, 5, split) > tight for split in [*splits, None])
    assert plan_level(vgg, canvas, styles, Settings(size=2048, tile=768), available=int(tight / 0.9) + 64).history == 3


def test_the_splits_are_the_pooling_layers_before_the_deepest_layer(net):
    content, style = smooth_image(61, 77, seed=2), smooth_image(54, 83, seed=3)
    settings = shallow_settings(size=77, levels=1, mixed_precision=False)
    criterion = build_criterion(net, content, _terms("all", style, None), settings, (61, 77))
    assert split_candidates(net, criterion.layers) == ["pool1", "pool2"]  # relu3_1 is the deepest
    with pytest.raises(FusionError, match="split: 'pool3' must be a pooling layer before the deepest layer"):
        TiledCriterion(criterion, (61, 77), 50, "pool3")


def test_a_run_that_cannot_fit_even_in_tiles_is_refused_with_the_estimate_and_a_size_that_fits(style):
    vgg = tiny_vgg("vgg19", width=64)
    styles = [GlobalStyle(style), LocalStyle(style)]
    with pytest.raises(
        FusionError,
        match=r"size: an output of 4224x4224 px needs about .* GiB even in tiles of \d+ px, but only 1.00 GiB is "
        r"free on cpu, and plans keep 10% of it spare \(0.90 GiB usable\); use a smaller size \(about \d+ px would fit",
    ):
        plan_level(vgg, (4224, 4224), styles, Settings(size=4096), available=2**30)


def test_progress_reports_the_tiles_and_the_history(net, every_layer_in_tiles):
    content, style = smooth_image(70, 90, seed=9), smooth_image(80, 80, seed=10)
    reports = []
    settings = shallow_settings(
        final_iterations=0,
        size=90,
        levels=1,
        iterations=3,
        mixed_precision=False,
        tile=56,
        history_size=7,
    )
    stylize(net, content, [GlobalStyle(style, layers=SHALLOW)], settings, on_progress=reports.append)
    expected = TilePlan(net.names, (78, 98), dict.fromkeys(["relu1_1", "relu2_1", "relu3_1"], (0, 0)), 56)
    assert {(p.tiles, p.history, p.split) for p in reports} == {(len(expected.tiles), 2, None)}  # 3 iterations: 2 pairs


def test_progress_reports_the_split_the_plan_chose(net):
    content, style = smooth_image(70, 90, seed=9), smooth_image(80, 80, seed=10)
    reports = []
    settings = shallow_settings(
        final_iterations=0,
        size=90,
        levels=1,
        iterations=2,
        mixed_precision=False,
        tile=40,
    )
    stylize(net, content, [GlobalStyle(style, layers=SHALLOW)], settings, on_progress=reports.append)
    # plenty of memory: the shallowest split, and the tiles of the layers up to it
    expected = TilePlan(net.names, (78, 98), {"relu1_1": (0, 0), "pool1": (0, 0)}, 40)
    assert {(p.tiles, p.split) for p in reports} == {(len(expected.tiles), "pool1")}


def test_the_last_level_runs_final_iterations_and_progress_counts_them(net):
    content, style = smooth_image(40, 56, seed=9), smooth_image(48, 48, seed=10)
    reports = []
    settings = Settings(size=56, levels=2, iterations=3, final_iterations=5, mixed_precision=False)
    stylize(net, content, [GlobalStyle(style, layers=SHALLOW)], settings, on_progress=reports.append)
    assert [(p.level, p.iteration, p.iterations) for p in reports] == [(1, i, 3) for i in (1, 2, 3)] + [
        (2, i, 5) for i in (1, 2, 3, 4, 5)
    ]
    assert [p.step for p in reports] == list(range(1, 9)) and {p.steps for p in reports} == {8}


def test_a_gram_of_a_tile_window_equals_the_gram_of_its_copy_with_the_same_gradient():
    """A window of a channels-last map (how a tile's positions come) takes the row-by-row product."""
    whole = torch.randn(1, 6, 11, 13).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    copy = whole.detach()[..., 2:9, 3:12].contiguous().requires_grad_(True)
    weight = torch.rand(1, 1, 7, 9)
    for square in (None, weight):
        window = whole[..., 2:9, 3:12]
        found, expected = gram_part(window, square, 0.1), gram_part(copy, square, 0.1)
        torch.testing.assert_close(found, expected)
        slope = torch.randn(1, 6, 6)
        (grad,) = torch.autograd.grad((found * slope).sum(), whole)
        (expected_grad,) = torch.autograd.grad((expected * slope).sum(), copy)
        torch.testing.assert_close(grad[..., 2:9, 3:12], expected_grad)
        assert grad[..., :2, :].abs().max() == 0  # nothing outside the window


@pytest.mark.parametrize("layout", ["window of a channels-last map", "channels-last", "contiguous"])
def test_the_gradient_of_a_gram_part_equals_autograds(layout):
    """What the second pass seeds a Gram term with: the gradient of <slope, gram_part(F)>, computed directly,
    against autograd through gram_part, in every layout gram_part takes, with and without weights."""
    whole = torch.randn(1, 6, 11, 13, dtype=torch.float64)
    if layout == "window of a channels-last map":
        features = whole.contiguous(memory_format=torch.channels_last)[..., 2:9, 3:12]
    elif layout == "channels-last":
        features = whole.contiguous(memory_format=torch.channels_last)
    else:
        features = whole
    slope = torch.randn(1, 6, 6, dtype=torch.float64)  # not symmetric: dL/dG of a sum need not be
    for square in (None, torch.rand(1, 1, *features.shape[-2:], dtype=torch.float64)):
        leaf = features.detach().requires_grad_(True)
        (expected,) = torch.autograd.grad((gram_part(leaf, square, 0.1) * slope).sum(), leaf)
        found = gram_part_grad(features, square, 0.1, slope)
        torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
        assert found.stride(1) == features.stride(1) or found.shape[1] == 1  # in the features' layout


def test_a_tiled_run_with_every_control_gives_the_untiled_image(net):
    """Two styles in two regions, a style mask, a style scale, a colour mode, the exact search: tiled as untiled."""
    content = smooth_image(70, 90, seed=9)
    first, second = smooth_image(80, 80, seed=10), smooth_image(64, 96, seed=11)
    region = _half_mask((70, 90))
    style_region = torch.zeros(80, 80)
    style_region[:, :50] = 1.0
    terms = [
        GlobalStyle(first, layers=SHALLOW, target_mask=region, style_mask=style_region),
        LocalStyle(first, target_mask=region, style_mask=style_region),
        GlobalStyle(second, layers=SHALLOW, target_mask=1 - region, scale=1.5),
        LocalStyle(second, target_mask=1 - region, scale=1.5),
    ]

    def run(tile: int, nudge: float = 0.0) -> torch.Tensor:
        settings = shallow_settings(
            size=90,
            levels=2,
            iterations=5,
            final_iterations=0,
            matcher="exact",
            mixed_precision=False,
            color="histogram",
            tile=tile,
        )
        moved = content + nudge * torch.randn(content.shape, generator=torch.Generator().manual_seed(1))
        return stylize(net, moved, terms, settings)

    untiled, tiled, nudged = run(0), run(60), run(0, nudge=1e-6)
    difference, rounding = (tiled - untiled).abs(), (nudged - untiled).abs()
    assert difference.mean() < 1e-4
    assert difference.mean() <= 3 * rounding.mean() + 1e-6


@pytest.mark.parametrize("above", [True, False], ids=["gradient-from-above", "nothing-above"])
def test_seeds_add_their_window_gradients_to_the_gradient_from_above(above):
    """The identity at a loss layer (tiling._Seeds.wrap): its backward pass adds each gradient given for the layer at
    the owned positions to the one from the layers above, as autograd would add the gradients of the same terms
    written through a slice; with nothing above, to zeros. The activation it passes on keeps its strides, the
    batch's included (the layers above take their memory layout from it)."""
    from fusion_core.precision import GradientScale
    from fusion_core.tiling import _Seeds

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, 9, 11, generator=generator).contiguous(memory_format=torch.channels_last)
    above_weight, window = torch.randn(1, 6, 9, 11, generator=generator), (slice(2, 7), slice(3, 10))
    first, second = torch.randn(1, 6, 5, 7, generator=generator), torch.randn(1, 6, 5, 7, generator=generator)

    ours = x.clone().requires_grad_(True)
    activation = ours * 2.0  # a non-leaf, as a layer's output is
    seeds = _Seeds(GradientScale(False))
    passed = seeds.wrap("relu1_1", activation, window)
    assert passed.stride() == activation.stride() and passed.is_contiguous(memory_format=torch.channels_last)
    seeds.add("relu1_1", lambda: first)
    seeds.add("relu1_1", lambda: second)
    seeds.add("relu1_1", lambda: None)  # a term with nothing to add
    roots = [*seeds.roots, (passed * above_weight).sum()] if above else seeds.roots
    torch.autograd.backward(roots)

    reference = x.clone().requires_grad_(True)
    direct = reference * 2.0
    total = (direct[..., window[0], window[1]] * (first + second)).sum()
    if above:
        total = total + (direct * above_weight).sum()
    total.backward()
    torch.testing.assert_close(ours.grad, reference.grad)


def test_total_variation_in_bands_equals_the_whole_image_and_its_gradient(monkeypatch):
    """The banded TV (bands of 3 rows over 10, the last one short) against a direct computation of the mean squared
    neighbour differences and autograd's gradient of it."""
    monkeypatch.setattr(tiling, "TV_BAND", 3)
    torch.manual_seed(5)
    image = torch.rand(1, 3, 10, 7, dtype=torch.float64)
    whole = image.clone().requires_grad_(True)
    direct = (whole[..., 1:, :] - whole[..., :-1, :]).square().mean() + (
        whole[..., 1:] - whole[..., :-1]
    ).square().mean()
    direct.backward()
    grad = torch.zeros_like(image)
    value = tiling._total_variation_in_bands(image, grad, weight=2.5)
    assert torch.allclose(value, direct.detach(), rtol=1e-12)
    assert torch.allclose(grad, 2.5 * whole.grad, rtol=1e-12, atol=1e-15)
