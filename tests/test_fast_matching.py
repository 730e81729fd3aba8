"""The fast (projected) patch search, the re-matching schedule and the mixed-precision paths (CUDA, CPU)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import smooth_image, tiny_vgg

from fusion_core import GlobalStyle, LocalStyle, Settings, precision, stylize
from fusion_core import matching as M
from fusion_core.config import PAPER_GLOBAL_LAYERS, preset
from fusion_core.losses import PatchLoss
from fusion_core.stylize import build_criterion

NATIVE_BFLOAT16 = precision.native_bfloat16  # the real probe (conftest replaces it during tests)
NO_GPU = "no CUDA GPU here: the float16 autocast path only runs on CUDA"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tensors here are tiny: waking a second thread costs more than it saves (much more on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def true_scores(query, style, size=3, stride=1):
    q = F.unfold(query.double(), size, stride=stride)[0].T
    s = F.unfold(style.double(), size, stride=stride)[0].T
    return q @ s.T / s.norm(dim=1).clamp_min(1e-8)


def vgg_features(seed, shape=(40, 48), layer="relu3_1"):
    """Activations of a tiny random VGG on a smooth image: correlated channels, like real features."""
    with torch.no_grad():
        return tiny_vgg("vgg19", width=4)(smooth_image(*shape, seed=seed), [layer])[layer]


@pytest.mark.parametrize("max_scores", [300, 1 << 24])  # a small budget forces many query bands
@pytest.mark.parametrize("stride", [1, 2])
def test_fast_equals_exact_when_the_candidates_cover_every_style_patch(max_scores, stride):
    torch.manual_seed(0)
    query, style = torch.randn(1, 5, 11, 9), torch.randn(1, 5, 10, 13)
    found = M.projected_nearest_patches(query, style, 3, stride, dims=4, candidates=1000, max_scores=max_scores)
    assert torch.equal(found, M.nearest_patches(query, style, 3, stride))


def test_fast_equals_exact_when_the_projection_keeps_every_dimension():
    torch.manual_seed(1)
    query, style = torch.randn(1, 4, 9, 10), torch.randn(1, 4, 12, 8)  # 36 dimensions per patch
    found = M.projected_nearest_patches(query, style, dims=36, candidates=1)
    assert torch.equal(found, M.nearest_patches(query, style))


@pytest.mark.parametrize("candidates", [1, 3, 50])
def test_fast_returns_valid_indices_honouring_style_eligibility(candidates):
    torch.manual_seed(2)
    query, style = torch.randn(1, 6, 10, 10), torch.randn(1, 6, 11, 12)
    n_style = 9 * 10
    eligible = torch.zeros(n_style, dtype=torch.bool)
    eligible[torch.randperm(n_style)[:7]] = True
    found = M.projected_nearest_patches(
        query,
        style,
        style_eligible=eligible,
        dims=8,
        candidates=candidates,
        max_scores=40,  # style bands merged
    )
    assert found.shape == (8 * 8,) and found.dtype == torch.long
    assert ((found >= 0) & (found < n_style)).all()
    assert eligible[found].all()
    if candidates >= 7:
        assert torch.equal(found, M.nearest_patches(query, style, style_eligible=eligible))


def test_fast_finds_a_near_best_patch_for_most_queries():
    query, style = vgg_features(seed=3), vgg_features(seed=4)  # 16 channels: 144 dimensions per patch
    scores = true_scores(query, style)
    best = scores.max(1).values
    found = M.projected_nearest_patches(query, style, dims=16, candidates=8)
    got = scores.gather(1, found[:, None])[:, 0]
    close = got >= best - 0.01 * best.abs()
    assert close.float().mean() >= 0.9, f"only {close.float().mean():.0%} within 1% of the best score"
    assert (got <= best + 1e-6 * best.abs()).all()


def test_the_previous_match_stays_a_candidate():
    query, style = vgg_features(seed=3), vgg_features(seed=4)
    search = M.ProjectedSearch(style, dims=2, candidates=1)  # too coarse to find the best on its own
    exact = M.nearest_patches(query, style)
    assert not torch.equal(search(query), exact)
    assert torch.equal(search(query, previous=exact), exact)


def test_propagation_never_loses_the_previous_match_and_honours_eligibility():
    query, style = vgg_features(seed=11), vgg_features(seed=12)
    scores = true_scores(query, style)
    eligible = torch.rand(scores.shape[1], generator=torch.Generator().manual_seed(0)) < 0.3
    search = M.ProjectedSearch(style, dims=4, candidates=2, style_eligible=eligible)
    previous = search(query)
    for _ in range(3):
        found = search.propagate(query, previous)
        assert eligible[found].all()
        gained = scores.gather(1, found[:, None]) - scores.gather(1, previous[:, None])
        assert (gained >= -1e-6).all()
        previous = found


def test_propagation_spreads_a_coherent_match_from_correct_neighbours():
    # The query is a crop of the style map: patch (r, c) is exactly style patch (r + 3, c + 5), the unique
    # best by Cauchy-Schwarz. Half the patches start with a random (wrong) match and no full search is run.
    style = torch.randn(1, 6, 20, 24, generator=torch.Generator().manual_seed(3))
    query = style[..., 3:15, 5:19]
    exact = M.nearest_patches(query, style)
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(12), indexing="ij")
    assert torch.equal(exact, ((rows + 3) * 22 + cols + 5).flatten())  # style grid: 18 x 22 patches
    generator = torch.Generator().manual_seed(4)
    wrong = torch.rand(exact.shape, generator=generator) < 0.5
    previous = torch.where(wrong, torch.randint(0, 18 * 22, exact.shape, generator=generator), exact)
    search = M.ProjectedSearch(style, dims=2, candidates=1)
    for _ in range(12):
        previous = search.propagate(query, previous)
    assert torch.equal(previous, exact)


def test_rematch_runs_a_full_search_every_n_th_call_and_propagates_between(monkeypatch):
    query, style = vgg_features(seed=13), vgg_features(seed=14)
    search = M.ProjectedSearch(style, dims=8, candidates=4)
    calls = []
    monkeypatch.setattr(M.ProjectedSearch, "propagate", lambda self, q, prev: calls.append("p") or prev)
    full = M.ProjectedSearch.__call__

    def counting_full(self, query, previous=None):
        calls.append("f")
        return full(self, query, previous)

    monkeypatch.setattr(M.ProjectedSearch, "__call__", counting_full)
    indices = None
    for _ in range(2 * M.FULL_SEARCH_EVERY + 1):
        indices = search.rematch(query, indices)
    every = ["f"] + ["p"] * (M.FULL_SEARCH_EVERY - 1)
    assert calls == every * 2 + ["f"]


def test_the_fast_search_is_deterministic():
    query, style = vgg_features(seed=5), vgg_features(seed=6)
    a = M.projected_nearest_patches(query, style, dims=8, candidates=4)
    assert torch.equal(a, M.projected_nearest_patches(query, style, dims=8, candidates=4))


def test_patch_loss_fits_the_projection_once(monkeypatch):
    fitted = []
    original = M.ProjectedSearch.__init__

    def counting_init(self, *args, **kwargs):
        fitted.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(M.ProjectedSearch, "__init__", counting_init)
    loss = PatchLoss("relu3_1", vgg_features(seed=7), matcher="fast")
    for seed in (8, 9, 10):
        loss.match({"relu3_1": vgg_features(seed=seed)})
    assert len(fitted) == 1
    assert loss.indices is not None and loss.indices.shape == (8 * 10,)  # relu3_1 of 40x48 is 10x12


def test_defaults_use_the_fast_search_and_the_exact_one_stays_available():
    settings = Settings()
    assert settings.matcher == "fast"
    assert M.MATCHERS["exact"] is M.nearest_patches and "fast" in M.MATCHERS


@pytest.mark.parametrize(("every", "levels", "iterations"), [(3, 1, 7), (2, 2, 3)])
def test_rematch_schedule_searches_exactly_every_k_iterations(monkeypatch, every, levels, iterations):
    calls = []

    def counting(query, style, size=3, stride=1, **kwargs):
        calls.append(1)
        return M.nearest_patches(query, style, size, stride, **kwargs)

    monkeypatch.setitem(M.MATCHERS, "counting", counting)
    searched = []  # (level, iteration) of every search, read from the progress reports
    content, style = smooth_image(24, 32, seed=1), smooth_image(32, 32, seed=2)

    def record(p):
        while len(searched) < len(calls):
            searched.append((p.level, p.iteration))

    # The paper's set-up: the local term (and so the search) on every level, Gram layers that fit 16 px levels.
    settings = preset("paper", size=32, levels=levels, iterations=iterations, matcher="counting", rematch_every=every)
    stylize(tiny_vgg(), content, [GlobalStyle(style), LocalStyle(style)], settings, on_progress=record)
    expected = [(level, i) for level in range(1, levels + 1) for i in range(1, iterations + 1) if (i - 1) % every == 0]
    assert searched == expected


def test_exact_matching_every_evaluation_still_runs():
    content, style = smooth_image(24, 32, seed=1), smooth_image(32, 32, seed=2)
    settings = Settings(size=32, levels=1, iterations=3, matcher="exact", rematch_every=1)
    out = stylize(tiny_vgg(), content, [GlobalStyle(style), LocalStyle(style)], settings)
    assert out.shape == (1, 3, 24, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("native", [False, True])
def test_mixed_precision_applies_where_the_hardware_has_16_bit_floats(native, monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda: native)
    assert precision.mixed_dtype(torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert precision.mixed_dtype("cuda") == torch.float16
    assert precision.mixed_dtype("cuda", wanted=False) is None
    assert precision.mixed_dtype("cpu", wanted=False) is None
    assert precision.mixed_dtype("mps") is None


def test_native_bfloat16_follows_the_cpu_probes(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", NATIVE_BFLOAT16)
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert precision.native_bfloat16() == (avx512_bf16 or amx)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not precision.native_bfloat16()  # no oneDNN: bfloat16 convolutions would not use the instructions


def test_gradient_scaling_is_exact_and_neutral():
    # The float16 pass scales gradients up on the way in and back down at the image: powers of two, exact.
    grads = []
    for enabled in (False, True):
        x = torch.linspace(-3, 3, 12).reshape(3, 4).requires_grad_(True)
        out = precision.out_of_half({"f": precision.into_half(x, enabled) * 3}, enabled)["f"]
        (out.square().sum() * 1e-9).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def record_activation_dtypes(vgg, dtypes):
    """Make ``vgg`` append the dtype of every activation it returns to ``dtypes``."""
    forward = vgg.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        dtypes.extend(value.dtype for value in out.values())
        return out

    vgg.forward = recording


def check_mixed_against_float32(criterion, device, half, rtol, min_cosine):
    """``criterion`` (mixed precision) runs the VGG pass in ``half`` and its losses and gradient in float32, and
    agrees with a float32 criterion on the same image."""
    image = smooth_image(24, 32, seed=3).to(device)
    dtypes = []
    record_activation_dtypes(criterion.vgg, dtypes)
    x = image.clone().requires_grad_(True)
    values = criterion(x, rematch=True)
    values["total"].backward()
    assert dtypes and set(dtypes) == {half}
    assert all(v.dtype == torch.float32 for v in values.values())
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    reference = _criterion(device, False)
    y = image.clone().requires_grad_(True)
    expected = reference(y, rematch=True)
    expected["total"].backward()
    torch.testing.assert_close(values["total"], expected["total"], rtol=rtol, atol=0)
    assert F.cosine_similarity(x.grad.flatten(), y.grad.flatten(), dim=0) > min_cosine


def _criterion(device, mixed_precision):
    content, style = smooth_image(24, 32, seed=1).to(device), smooth_image(32, 32, seed=2).to(device)
    vgg = tiny_vgg().to(device)
    settings = Settings(size=32, levels=1, mixed_precision=mixed_precision)
    # Not relu5_1: at 24 x 32 px it has two positions, whose Gram matrix in 16 bits is mostly rounding.
    global_style = GlobalStyle(style, layers=PAPER_GLOBAL_LAYERS)
    return build_criterion(vgg, content, [global_style, LocalStyle(style)], settings, (24, 32))


def test_criterion_on_a_cpu_without_bfloat16_is_float32_whatever_the_setting(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda: False)
    image = smooth_image(24, 32, seed=3)
    results = []
    for mixed in (False, True):
        criterion = _criterion("cpu", mixed)
        assert criterion.half_dtype is None
        x = image.clone().requires_grad_(True)
        values = criterion(x, rematch=True)
        values["total"].backward()
        results.append((values["total"].detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_cpu_mixed_precision_runs_vgg_in_bfloat16_and_losses_in_float32(monkeypatch):
    # Forced on, so it runs on any CPU (without bfloat16 instructions it is only slower), with the path
    # CUDA's float16 takes: the same casts, gradient scaling and float32 losses.
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)
    criterion = _criterion("cpu", True)
    assert criterion.half_dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: on this tiny random network the Gram term's gradient alone agrees with
    # float32 to a cosine of ~0.97, the local and content terms' to ~0.98-0.99.
    check_mixed_against_float32(criterion, "cpu", torch.bfloat16, rtol=5e-2, min_cosine=0.96)


def test_stylize_in_bfloat16_reaches_the_float32_result(monkeypatch):
    # The whole optimisation with the bfloat16 pass: its result, scored by a float32 criterion, is as good as
    # the float32 run's from the same start. Not equal: the two runs take different paths (at this tiny size
    # the final loss varies by ~10% between seeds in either precision).
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)
    content, style = smooth_image(24, 32, seed=1), smooth_image(32, 32, seed=2)
    styles = [GlobalStyle(style), LocalStyle(style)]
    settings = Settings(size=32, levels=1, iterations=40, seed=3)
    vgg = tiny_vgg(width=8)
    dtypes = []
    record_activation_dtypes(vgg, dtypes)
    judge = build_criterion(vgg, content, styles, Settings(size=32, levels=1, mixed_precision=False), (24, 32))
    start = judge(torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(3)), rematch=True)["total"]
    final = {}
    for mixed in (True, False):
        dtypes.clear()
        image = stylize(vgg, content, styles, replace(settings, mixed_precision=mixed))
        assert (torch.bfloat16 in dtypes) == mixed  # the targets are computed in float32 either way
        final[mixed] = float(judge(image, rematch=True)["total"])
    assert max(final.values()) < 0.5 * float(start)
    assert abs(final[True] - final[False]) < 0.15 * final[False], final


@cuda
def test_cuda_mixed_precision_runs_vgg_in_float16_and_losses_in_float32():
    criterion = _criterion("cuda", True)
    assert criterion.half_dtype == torch.float16
    check_mixed_against_float32(criterion, "cuda", torch.float16, rtol=2e-2, min_cosine=0.99)


@cuda
def test_cuda_fast_search_under_autocast_agrees_with_float32():
    query, style = vgg_features(seed=3).cuda(), vgg_features(seed=4).cuda()
    eligible = torch.rand(8 * 10, generator=torch.Generator().manual_seed(0)) < 0.5
    eligible = eligible.cuda()
    plain = M.projected_nearest_patches(query, style, style_eligible=eligible, dims=16, candidates=8)
    with precision.autocast(torch.device("cuda"), torch.float16):
        half = M.projected_nearest_patches(query.half(), style, style_eligible=eligible, dims=16, candidates=8)
        exact = M.nearest_patches(query.half(), style, style_eligible=eligible)
    assert eligible[half].all()
    assert (half == plain).float().mean() > 0.95
    assert torch.equal(exact, M.nearest_patches(query, style, style_eligible=eligible))
