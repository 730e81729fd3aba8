"""The fast (projected) patch search, the re-matching schedule and the mixed-precision paths (CUDA, CPU)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import smooth_image, tiny_vgg

from fusion_core import GlobalStyle, LocalStyle, Settings, precision
from fusion_core import matching as M
from fusion_core.config import MATCH_METRICS, MATCHER_NAMES, preset
from fusion_core.losses import PatchLoss
from fusion_core.stylize import stylize

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


def true_scores(query, style, size=3, stride=1, metric="correlation"):
    """Higher is nearer: <q, s> / |s|, or minus the squared distance (from ``torch.cdist``)."""
    q = F.unfold(query.double(), size, stride=stride)[0].T
    s = F.unfold(style.double(), size, stride=stride)[0].T
    if metric == "distance":
        return -torch.cdist(q, s).square()
    return q @ s.T / s.norm(dim=1).clamp_min(1e-8)


def vgg_features(seed, shape=(40, 48), layer="relu3_1"):
    """Activations of a tiny random VGG on a smooth image: correlated channels, like real features."""
    with torch.no_grad():
        return tiny_vgg("vgg19", width=4)(smooth_image(*shape, seed=seed), [layer])[layer]


METRICS = pytest.mark.parametrize("metric", ["correlation", "distance"])


@pytest.mark.parametrize("max_scores", [300, 1 << 24])  # a small budget forces many query bands
@pytest.mark.parametrize("stride", [1, 2])
@METRICS
def test_fast_equals_exact_when_the_candidates_cover_every_style_patch(max_scores, stride, metric):
    torch.manual_seed(0)
    query, style = torch.randn(1, 5, 11, 9), torch.randn(1, 5, 10, 13) * torch.linspace(0.2, 3, 13)
    found = M.projected_nearest_patches(
        query, style, 3, stride, dims=4, candidates=1000, max_scores=max_scores, metric=metric
    )
    assert torch.equal(found, M.nearest_patches(query, style, 3, stride, metric=metric))


@METRICS
def test_fast_equals_exact_when_the_projection_keeps_every_dimension(metric):
    torch.manual_seed(1)
    query, style = torch.randn(1, 4, 9, 10), torch.randn(1, 4, 12, 8) * torch.linspace(0.2, 3, 8)  # 36 dimensions
    found = M.projected_nearest_patches(query, style, dims=36, candidates=1, metric=metric)
    assert torch.equal(found, M.nearest_patches(query, style, metric=metric))


@pytest.mark.parametrize("max_scores", [256 * 640, 1 << 24])  # bands of 640 style patches; one band and a tail
@METRICS
def test_fast_equals_exact_on_a_style_long_enough_for_the_two_stage_top_k(max_scores, metric):
    torch.manual_seed(3)
    query, style = torch.randn(1, 4, 20, 24), torch.randn(1, 4, 47, 53)  # 2295 style patches of 36 dimensions
    found = M.projected_nearest_patches(query, style, dims=36, candidates=2, max_scores=max_scores, metric=metric)
    assert torch.equal(found, M.nearest_patches(query, style, metric=metric))


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


@METRICS
def test_fast_finds_a_near_best_patch_for_most_queries(metric):
    query, style = vgg_features(seed=3), vgg_features(seed=4)  # 16 channels: 144 dimensions per patch
    scores = true_scores(query, style, metric=metric)
    best = scores.max(1).values
    found = M.projected_nearest_patches(query, style, dims=16, candidates=8, metric=metric)
    got = scores.gather(1, found[:, None])[:, 0]
    close = got >= best - 0.01 * best.abs()
    assert close.float().mean() >= 0.9, f"only {close.float().mean():.0%} within 1% of the best score"
    assert (got <= best + 1e-6 * best.abs()).all()


def test_the_previous_match_stays_a_candidate():
    query, style = vgg_features(seed=3), vgg_features(seed=4)
    search = M.ProjectedSearch(style, dims=2, candidates=1)  # too coarse to find the best on its own
    exact = M.nearest_patches(query, style)
    assert not torch.equal(search.full_search(query), exact)
    assert torch.equal(search.full_search(query, previous=exact), exact)


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


def test_a_call_runs_a_full_search_every_n_th_time_and_propagates_between(monkeypatch):
    query, style = vgg_features(seed=13), vgg_features(seed=14)
    search = M.ProjectedSearch(style, dims=8, candidates=4)
    calls = []
    monkeypatch.setattr(M.ProjectedSearch, "propagate", lambda self, q, prev: calls.append("p") or prev)
    full = M.ProjectedSearch.full_search

    def counting_full(self, query, previous=None):
        calls.append("f")
        return full(self, query, previous)

    monkeypatch.setattr(M.ProjectedSearch, "full_search", counting_full)
    indices = None
    for _ in range(2 * M.FULL_SEARCH_EVERY + 1):
        indices = search(query, indices)
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


@pytest.mark.parametrize("matcher", ["fast", "exact"])
def test_a_match_says_whether_it_was_a_full_search(matcher):
    """A full search frees large blocks, which the level loop has the C allocator give back (BENCHMARKS.md: an
    untiled 2048 px level peaked at 9-13 GB against its 6.8 GB estimate): ``match`` says which matches were full."""
    loss = PatchLoss("relu3_1", vgg_features(seed=7), matcher=matcher)
    found = [loss.match({"relu3_1": vgg_features(seed=seed)}) for seed in range(8, 8 + 2 * M.FULL_SEARCH_EVERY + 1)]
    if matcher == "fast":  # a full search at the first match and every FULL_SEARCH_EVERY-th, propagations between
        assert found == [i % M.FULL_SEARCH_EVERY == 0 for i in range(len(found))]
    else:
        assert all(found)


def test_the_level_loop_trims_the_heaps_before_each_plan_and_after_full_searches_only(monkeypatch):
    import fusion_core.stylize as stylize_module

    events = []
    monkeypatch.setattr(stylize_module, "trim_heaps", lambda: events.append("trim"))
    original = PatchLoss.match

    def match(self, features):
        full = original(self, features)
        events.append("full" if full else "propagation")
        return full

    monkeypatch.setattr(PatchLoss, "match", match)
    content, style = smooth_image(40, 48, seed=1), smooth_image(40, 48, seed=2)
    settings = Settings(final_iterations=0, size=48, levels=1, iterations=5, init="content")
    stylize_module.stylize(tiny_vgg(), content, [LocalStyle(style)], settings)
    # the plan before any work, the level's plan, then a trim after each full search and after nothing else
    assert events == ["trim", "trim", "full", "trim", "propagation", "propagation", "full", "trim", "propagation"]


def test_defaults_use_the_fast_search_and_the_exact_one_stays_available():
    settings = Settings()
    assert settings.matcher == "fast"
    assert M.MATCHERS["exact"] is M.ExactSearch and M.MATCHERS["fast"] is M.ProjectedSearch


def test_the_matchers_are_the_names_settings_accept():
    assert sorted(M.MATCHERS) == sorted(MATCHER_NAMES)


def test_the_metrics_are_the_names_settings_accept():
    assert sorted(M.METRICS) == sorted(MATCH_METRICS)


@pytest.mark.parametrize("name", sorted(M.MATCHERS))
@METRICS
def test_every_matcher_follows_the_protocol(name, metric):
    # Built as cls(style, size, stride, eligible, metric=...), called as search(query, previous) -> style indices:
    # the exact one equals a brute-force search whatever ``previous`` is; the fast one finds good eligible patches
    # and, given its last match, never returns a worse one.
    query, style = vgg_features(seed=21), vgg_features(seed=22)
    scores = true_scores(query, style, metric=metric)
    eligible = torch.rand(scores.shape[1], generator=torch.Generator().manual_seed(1)) < 0.5
    brute = scores.masked_fill(~eligible, -float("inf")).argmax(1)
    best = scores.gather(1, brute[:, None])[:, 0]
    search = M.MATCHERS[name](style, 3, 1, eligible, metric=metric)
    previous = None
    for _ in range(2 * M.FULL_SEARCH_EVERY):
        found = search(query, previous)
        assert found.dtype == torch.long and eligible[found].all()
        got = scores.gather(1, found[:, None])[:, 0]
        if name == "exact":
            assert torch.equal(found, brute)
            previous = brute.flip(0)  # a wrong "last match": the exact search must ignore it
            continue
        assert (got >= best - 0.01 * best.abs()).float().mean() >= 0.9
        if previous is not None:
            assert (got >= scores.gather(1, previous[:, None])[:, 0] - 1e-6).all()
        previous = found


@pytest.mark.parametrize("name", sorted(M.MATCHERS))
def test_every_matcher_refuses_a_style_with_no_eligible_patch(name):
    style = vgg_features(seed=22)
    with pytest.raises(ValueError, match="eligible"):
        M.MATCHERS[name](style, 3, 1, torch.zeros(8 * 10, dtype=torch.bool))


def test_the_searches_never_wait_for_the_device(monkeypatch):
    # Every Python-level way of reading a tensor's value on the host raises inside the searches: loop bounds and
    # chunk sizes come from shapes only, so a GPU's queue never drains between chunks. (Fitting the projection,
    # once per level, may read values; it runs before the trap is set.)
    query, style = vgg_features(seed=23), vgg_features(seed=24)
    eligible = torch.rand(8 * 10, generator=torch.Generator().manual_seed(2)) < 0.7
    fast = M.ProjectedSearch(style, 3, 1, eligible, max_scores=500, gather_budget=2000)  # many chunks
    exact = M.ExactSearch(style, 3, 1, eligible, max_scores=50)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    results = []
    with monkeypatch.context() as trap:
        for method in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            trap.setattr(torch.Tensor, method, host_read)
        previous = None
        for _ in range(M.FULL_SEARCH_EVERY + 1):  # full searches and propagations
            previous = fast(query, previous)
            results.append(previous)
        results.append(exact(query, None))
    assert all(eligible[found].all() for found in results)
    assert torch.equal(results[-1], M.nearest_patches(query, style, style_eligible=eligible))


@pytest.mark.parametrize(("every", "levels", "iterations"), [(3, 1, 7), (2, 2, 3)])
def test_rematch_schedule_searches_exactly_every_k_iterations(monkeypatch, every, levels, iterations):
    calls = []

    class CountingSearch(M.ExactSearch):
        def __call__(self, query, previous=None):
            calls.append(1)
            return super().__call__(query, previous)

    monkeypatch.setitem(M.MATCHERS, "exact", CountingSearch)  # under a name Settings accepts
    searched = []  # (level, iteration) of every search, read from the progress reports
    content, style = smooth_image(24, 32, seed=1), smooth_image(32, 32, seed=2)

    def record(p):
        while len(searched) < len(calls):
            searched.append((p.level, p.iteration))

    # The paper's set-up: the local term (and so the search) on every level, Gram layers that fit 16 px levels.
    settings = preset("paper", size=32, levels=levels, iterations=iterations, matcher="exact", rematch_every=every)
    stylize(tiny_vgg(), content, [GlobalStyle(style), LocalStyle(style)], settings, on_progress=record)
    expected = [(level, i) for level in range(1, levels + 1) for i in range(1, iterations + 1) if (i - 1) % every == 0]
    assert searched == expected


def test_exact_matching_every_evaluation_still_runs():
    content, style = smooth_image(24, 32, seed=1), smooth_image(32, 32, seed=2)
    settings = Settings(final_iterations=0, size=32, levels=1, iterations=3, matcher="exact", rematch_every=1)
    out = stylize(tiny_vgg(), content, [GlobalStyle(style), LocalStyle(style)], settings)
    assert out.shape == (1, 3, 24, 32) and torch.isfinite(out).all()


@cuda
@METRICS
def test_cuda_fast_search_under_autocast_agrees_with_float32(metric):
    query, style = vgg_features(seed=3).cuda(), vgg_features(seed=4).cuda()
    eligible = torch.rand(8 * 10, generator=torch.Generator().manual_seed(0)) < 0.5
    eligible = eligible.cuda()
    kw = dict(style_eligible=eligible, dims=16, candidates=8, metric=metric)
    plain = M.projected_nearest_patches(query, style, **kw)
    with precision.autocast(torch.device("cuda"), torch.float16):
        half = M.projected_nearest_patches(query.half(), style, **kw)
        exact = M.nearest_patches(query.half(), style, style_eligible=eligible, metric=metric)
    assert eligible[half].all()
    assert (half == plain).float().mean() > 0.95
    assert torch.equal(exact, M.nearest_patches(query, style, style_eligible=eligible, metric=metric))


@METRICS
def test_fast_search_under_cpu_bfloat16_autocast_finds_near_best_patches(metric):
    # the candidate scores run in bfloat16 there (8 bits of mantissa); the "distance" scores are kept of the order
    # of 1 (the style's unit) so they lose no more than the correlation's; the exact re-ranking stays float32
    query, style = vgg_features(seed=3), vgg_features(seed=4)
    scores = true_scores(query, style, metric=metric)
    best = scores.max(1).values
    with torch.autocast("cpu", torch.bfloat16):
        found = M.projected_nearest_patches(query, style, dims=16, candidates=8, metric=metric)
    got = scores.gather(1, found[:, None])[:, 0]
    close = got >= best - 0.01 * best.abs()
    assert close.float().mean() >= 0.9, f"only {close.float().mean():.0%} within 1% of the best score"
