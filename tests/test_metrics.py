"""benchmarks/metrics.py against direct computations: sliced Wasserstein distance, SSIM, the feature measures."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import smooth_image, tiny_vgg

_spec = importlib.util.spec_from_file_location(
    "fusion_benchmark_metrics", Path(__file__).resolve().parents[1] / "benchmarks" / "metrics.py"
)
metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(metrics)


def points(n: int, channels: int, seed: int) -> torch.Tensor:
    return torch.randn(n, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_w1_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two 1-D samples as the integral of |F_a(x) - F_b(x)| dx over the merged sorted values."""
    values = torch.cat([a, b]).sort().values
    cdf_a = (a[None, :] <= values[:-1, None]).double().mean(1)
    cdf_b = (b[None, :] <= values[:-1, None]).double().mean(1)
    return float(((cdf_a - cdf_b).abs() * values.diff()).sum())


def w2_by_repetition(a: torch.Tensor, b: torch.Tensor) -> float:
    """W2 between 1-D samples: repeat each sorted sample up to the least common multiple of the counts."""
    n = math.lcm(len(a), len(b))
    qa = a.sort().values.repeat_interleave(n // len(a))
    qb = b.sort().values.repeat_interleave(n // len(b))
    return float((qa - qb).square().mean().sqrt())


# --- sliced Wasserstein distance ---


def test_swd_of_identical_sets_is_zero():
    a = points(50, 8, 0)
    assert metrics.sliced_wasserstein(a, a) == 0.0
    # ... and of the same set in another order (a distance between distributions, not between positions).
    assert metrics.sliced_wasserstein(a, a[torch.randperm(50, generator=torch.Generator().manual_seed(1))]) < 1e-12


def test_swd_equals_exact_1d_wasserstein_for_one_channel():
    a, b = points(12, 1, 0)[:, 0], points(12, 1, 1)[:, 0] * 2 + 0.5
    direct_w2 = float((a.sort().values - b.sort().values).square().mean().sqrt())
    assert metrics.sliced_wasserstein(a[:, None], b[:, None]) == pytest.approx(direct_w2, rel=1e-12)
    assert metrics.sliced_wasserstein(a[:, None], b[:, None], p=1) == pytest.approx(exact_w1_1d(a, b), rel=1e-12)


def test_swd_resamples_unequal_counts_exactly():
    a, b = points(4, 1, 2)[:, 0], points(6, 1, 3)[:, 0] + 1.0
    assert metrics.sliced_wasserstein(a[:, None], b[:, None]) == pytest.approx(w2_by_repetition(a, b), rel=1e-12)
    assert metrics.sliced_wasserstein(a[:, None], b[:, None], p=1) == pytest.approx(exact_w1_1d(a, b), rel=1e-12)
    c = points(7, 1, 4)[:, 0]  # coprime counts: 7 and 6 share no step but the last
    assert metrics.sliced_wasserstein(c[:, None], b[:, None], p=1) == pytest.approx(exact_w1_1d(c, b), rel=1e-12)


def test_swd_matches_a_direct_projection_loop():
    a, b = points(9, 5, 5), points(15, 5, 6) * 1.5
    theta = metrics.projections(5, 16, seed=3)
    per_direction = [w2_by_repetition(a @ theta[:, k], b @ theta[:, k]) ** 2 for k in range(16)]
    expected = math.sqrt(sum(per_direction) / 16)
    assert metrics.sliced_wasserstein(a, b, count=16, seed=3) == pytest.approx(expected, rel=1e-10)


def test_swd_is_symmetric():
    a, b = points(30, 6, 7), points(45, 6, 8) + 0.3
    assert metrics.sliced_wasserstein(a, b) == pytest.approx(metrics.sliced_wasserstein(b, a), rel=1e-12)


def test_swd_of_a_shift_is_the_projected_shift_and_grows_with_it():
    a = points(40, 4, 9)
    direction = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    theta = metrics.projections(4, metrics.PROJECTIONS)
    distances = []
    for c in (0.1, 0.5, 1.0, 2.0):
        d = metrics.sliced_wasserstein(a, a + c * direction)
        assert d == pytest.approx(c * float((direction @ theta).square().mean().sqrt()), rel=1e-9)
        distances.append(d)
    assert distances == sorted(distances) and distances[0] > 0


def test_swd_accepts_feature_maps_and_checks_channels():
    fmap = points(12, 3, 10).T.reshape(1, 3, 3, 4)
    assert metrics.sliced_wasserstein(fmap, metrics.feature_points(fmap)) == 0.0
    assert metrics.feature_points(fmap)[5].tolist() == fmap[0, :, 1, 1].tolist()
    with pytest.raises(ValueError, match="channel"):
        metrics.sliced_wasserstein(points(5, 3, 0), points(5, 4, 0))


def test_projections_are_seeded_unit_vectors():
    theta = metrics.projections(7, 10, seed=4)
    assert torch.allclose(theta.norm(dim=0), torch.ones(10, dtype=torch.float64))
    assert torch.equal(theta, metrics.projections(7, 10, seed=4))
    assert not torch.equal(theta, metrics.projections(7, 10, seed=5))


# --- SSIM ---


def test_ssim_of_an_image_with_itself_is_one():
    x = metrics.luminance(smooth_image(20, 24, 0))
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(x, 1 - x) < 0.5


def test_ssim_matches_the_formula_on_one_window():
    # An 11x11 image pair holds exactly one window position: SSIM is the formula with Gaussian-weighted statistics.
    x = smooth_image(11, 11, 1)[:, :1].double()
    y = (0.7 * x + 0.2 + 0.05 * torch.sin(torch.arange(121, dtype=torch.float64)).view(1, 1, 11, 11)).clamp(0, 1)
    g = torch.tensor([math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)], dtype=torch.float64)
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    mx, my = float((w * x[0, 0]).sum()), float((w * y[0, 0]).sum())
    vx = float((w * (x[0, 0] - mx) ** 2).sum())
    vy = float((w * (y[0, 0] - my) ** 2).sum())
    cov = float((w * (x[0, 0] - mx) * (y[0, 0] - my)).sum())
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-10)


def test_ssim_falls_with_noise_and_checks_shapes():
    x = metrics.luminance(smooth_image(32, 32, 2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    values = [metrics.ssim(x, (x + s * noise).clamp(0, 1)) for s in (0.01, 0.05, 0.2)]
    assert values == sorted(values, reverse=True) and values[0] < 1
    with pytest.raises(ValueError, match="window"):
        metrics.ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="shape"):
        metrics.ssim(x, x[..., :20])


def test_luminance_weights():
    image = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1)
    assert float(metrics.luminance(image)) == pytest.approx(0.299 + 0.587 * 0.5 + 0.114 * 0.25)


# --- palette distance ---


def two_colour_image(height: int, width: int, top: list[float], bottom: list[float]) -> torch.Tensor:
    image = torch.empty(1, 3, height, width)
    image[0, :, : height // 2] = torch.tensor(top).view(3, 1, 1)
    image[0, :, height // 2 :] = torch.tensor(bottom).view(3, 1, 1)
    return image


def test_palette_distance_against_a_direct_computation():
    # At 256 px on the long side nothing is resized, so the pixel sets are exactly known: the output is one colour
    # u, the style half v1 and half v2. Along a direction t the sorted projections pair u with v1 for half the
    # quantiles and with v2 for the other half, so W2^2 = (t.(u - v1))^2 / 2 + (t.(u - v2))^2 / 2.
    u, v1, v2 = [0.2, 0.5, 0.9], [0.9, 0.1, 0.1], [0.0, 0.3, 0.6]
    output = two_colour_image(128, 256, u, u)
    style = two_colour_image(256, 200, v1, v2)
    theta = metrics.projections(3)
    along = {name: torch.tensor(c, dtype=torch.float64) @ theta for name, c in (("u", u), ("v1", v1), ("v2", v2))}
    direct = (((along["u"] - along["v1"]).square() + (along["u"] - along["v2"]).square()) / 2).mean().sqrt()
    assert metrics.palette_distance(output, style) == pytest.approx(float(direct), rel=1e-5)


def test_palette_distance_ignores_where_colours_are_and_resizes_both_images():
    generator = torch.Generator().manual_seed(3)
    style = torch.rand(1, 3, 192, 256, generator=generator)
    shuffled = style.flatten(2)[..., torch.randperm(192 * 256, generator=generator)].view_as(style)
    assert metrics.palette_distance(style, style) == 0.0
    assert metrics.palette_distance(shuffled, style) < 1e-6  # the same colours elsewhere
    # Both are resized to 256 px first: a 512 px black-and-white checkerboard of 1 px squares becomes mid-grey.
    checkerboard = ((torch.arange(512)[:, None] + torch.arange(512)[None, :]) % 2).float().expand(1, 3, 512, 512)
    grey = torch.full((1, 3, 100, 50), 0.5)
    assert metrics.palette_distance(checkerboard, grey) < 1e-3
    assert metrics.palette_distance(checkerboard, grey, size=512) > 0.4  # unresized: black and white


# --- measures on network features ---


def test_evaluate_on_a_tiny_network():
    vgg = tiny_vgg("vgg16")
    content, style = smooth_image(32, 48, 3), smooth_image(40, 40, 4)
    same = metrics.evaluate(vgg, content, content, style)
    assert same["content_dist"] == 0.0 and same["ssim"] == pytest.approx(1.0)
    assert set(same["style_swd_layers"]) == set(metrics.STYLE_LAYERS)
    assert same["style_swd"] == pytest.approx(sum(same["style_swd_layers"].values()) / 4)
    # The style image itself, at the output's longest side, is at distance 0 from the style.
    styled = metrics.resize(style, (48, 48))
    assert metrics.evaluate(vgg, styled, content, style)["style_swd"] < 1e-6
    other = metrics.evaluate(vgg, smooth_image(32, 48, 5), content, style)
    assert other["content_dist"] > 0 and other["ssim"] < 1
    assert other["palette_dist"] == metrics.palette_distance(smooth_image(32, 48, 5), style)


def test_best_patch_cosine_matches_a_brute_force_search():
    generator = torch.Generator().manual_seed(7)
    output = torch.randn(1, 4, 7, 9, generator=generator)
    style = torch.randn(1, 4, 8, 6, generator=generator).relu()
    q = torch.nn.functional.unfold(output.double(), 3)[0].T
    s = torch.nn.functional.unfold(style.double(), 3)[0].T
    cosines = (q / q.norm(dim=1, keepdim=True)) @ (s / s.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(metrics.best_patch_cosine(output, style), cosines.max(1).values)


def test_patch_distance_is_zero_for_the_style_itself_and_positive_otherwise():
    vgg = tiny_vgg("vgg16")
    style = smooth_image(40, 40, 4)
    itself = metrics.patch_distance(vgg, style, style)
    assert set(itself) == {*metrics.PATCH_LAYERS, "mean"} and itself["mean"] == pytest.approx(0.0, abs=1e-9)
    other = metrics.patch_distance(vgg, smooth_image(40, 40, 9), style)
    assert 0 < other["mean"] <= 2


# --- motifs pasted out of place, and where an output strays from the content ---


def test_motif_mask_counts_positions_by_their_centre():
    mask = metrics.motif_mask((4, 10), [[0.0, 0.0, 0.25, 0.5], [0.9, 0.75, 1.0, 1.0]])
    expected = torch.zeros(4, 10, dtype=torch.bool)
    expected[:2, :3] = True  # centres 0.05, 0.15, 0.25 (x; the edge counts) and 0.125, 0.375 (y)
    expected[3, 9] = True  # centre (0.95, 0.875)
    assert torch.equal(mask, expected)


def brute_force_coherence(index: torch.Tensor, grid: tuple[int, int], style_cols: int) -> torch.Tensor:
    rows, cols = grid
    out = torch.zeros(rows, cols, dtype=torch.bool)
    for y in range(rows):
        for x in range(cols):
            my, mx = divmod(int(index[y * cols + x]), style_cols)
            agree = total = 0
            for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < rows and 0 <= nx < cols:
                    ty, tx = divmod(int(index[ny * cols + nx]), style_cols)
                    total += 1
                    agree += abs(ty - (my + dy)) <= 1 and abs(tx - (mx + dx)) <= 1
            out[y, x] = agree * 2 >= total
    return out


def test_coherent_matches_against_a_brute_force_loop():
    generator = torch.Generator().manual_seed(3)
    style_rows, style_cols, grid = 9, 11, (6, 7)
    # a copied block (matches shifted with their positions) beside random matches
    index = torch.randint(0, style_rows * style_cols, (grid[0] * grid[1],), generator=generator)
    for y in range(3):
        for x in range(4):
            index[y * grid[1] + x] = (y + 2) * style_cols + (x + 5)
    found = metrics.coherent_matches(index, grid, style_cols)
    assert torch.equal(found, brute_force_coherence(index, grid, style_cols))
    assert found[:3, :4].all()  # the copied block


def test_motif_share_of_a_copied_motif_and_of_a_copy_elsewhere():
    generator = torch.Generator().manual_seed(5)
    style = torch.rand(1, 4, 12, 12, generator=generator)
    motif = torch.zeros(12, 12, dtype=torch.bool)
    motif[2:6, 2:6] = True
    # the output is the style's block [1:7, 1:7] (patch centres 2..5: all inside the motif) ...
    output = style[..., 1:7, 1:7].clone()
    assert metrics.motif_share_of_maps(output, style, motif) == 1.0
    # ... unless the content there is the motif too: the photo calls for it
    assert metrics.motif_share_of_maps(output, style, motif, content=output) == 0.0
    assert metrics.motif_share_of_maps(output, style, motif, content=style[..., 5:11, 5:11]) == 1.0
    # ... or a block away from it: the same patches copied, none from the motif
    elsewhere = style[..., 5:12, 5:12].clone()
    assert metrics.motif_share_of_maps(elsewhere, style, motif) == 0.0
    # the motif's patches scattered (every other patch of the block, in a shuffled order): no coherent copy
    scattered = torch.cat([style[..., 1:7, 1:7].flip(-1), style[..., 1:7, 1:7]], dim=-1).flip(-2)
    assert metrics.motif_share_of_maps(scattered, style, motif) < 0.5


def test_tile_distances_against_a_direct_sum():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 3, 9, 10, generator=generator), torch.rand(1, 3, 9, 10, generator=generator)
    found = metrics.tile_distances(a, b, positions=4)
    square = (a - b).double().square().sum(1)[0]
    sums = torch.tensor([[float(square[y : y + 4, x : x + 4].sum()) for x in range(0, 10, 4)] for y in range(0, 9, 4)])
    whole = sums[:2, :2].mean()  # the tiles of a full 4 x 4
    assert torch.allclose(found, sums.double() / whole)
    assert found.shape == (3, 3)


def test_local_content_distance_finds_the_tile_that_changed():
    vgg = tiny_vgg()
    content = smooth_image(64, 96, seed=4)
    output = content.clone()
    output[..., 32:48, 64:80] = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tiles = metrics.local_content_distance(vgg, output, content, layer="relu2_1")
    # relu2_1 has one pool: 4 positions per tile = 8 px; the changed block, widened by the receptive field, is worst
    worst = divmod(int(tiles.flatten().argmax()), tiles.shape[1])
    assert 3 <= worst[0] <= 6 and 7 <= worst[1] <= 10
    assert float(metrics.local_content_distance(vgg, content, content, layer="relu2_1").max()) == 0.0
