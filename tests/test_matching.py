"""The chunked computations of the patch search equal direct ones, chunk boundaries and ties included: the exact
search against a brute-force search (both metrics: correlation, and distance against ``torch.cdist``), the fast
search's patch products against unfolded patches, its two-stage top-k against ``torch.topk``."""

import pytest
import torch
import torch.nn.functional as F

from fusion_core.functional import positions_last
from fusion_core.matching import _patch_dots, _top_candidates, nearest_patches


def brute_force(query, style, size, stride, eligible=None, metric="correlation"):
    q = F.unfold(query, size, stride=stride)[0].T.double()
    s = F.unfold(style, size, stride=stride)[0].T.double()
    # the nearest in squared distance is computed as distances
    scores = q @ s.T / s.norm(dim=1).clamp_min(1e-8) if metric == "correlation" else -torch.cdist(q, s).square()
    if eligible is not None:
        scores[:, ~eligible] = -float("inf")
    return scores.argmax(dim=1)  # the first of equal maxima


@pytest.mark.parametrize("max_scores", [1, 7, 50, 1 << 24])  # 1 and 7 force one-row bands everywhere
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("metric", ["correlation", "distance"])
def test_chunked_search_equals_brute_force(max_scores, stride, metric):
    torch.manual_seed(0)
    # style patches of unequal strength, so the two metrics disagree on many queries
    query, style = torch.randn(1, 5, 11, 9), torch.randn(1, 5, 10, 13) * torch.linspace(0.2, 3, 13)
    found = nearest_patches(query, style, 3, stride, max_scores=max_scores, metric=metric)
    assert torch.equal(found, brute_force(query, style, 3, stride, metric=metric))


def test_the_metrics_disagree_where_the_style_patches_differ_in_strength():
    torch.manual_seed(0)
    query, style = torch.randn(1, 5, 11, 9), torch.randn(1, 5, 10, 13) * torch.linspace(0.2, 3, 13)
    correlation, distance = (nearest_patches(query, style, metric=m) for m in ("correlation", "distance"))
    assert (correlation != distance).float().mean() > 0.3


def test_distance_matches_a_faint_patch_to_a_faint_stroke_not_to_a_strong_motif():
    # Style: a strong "eye" (pattern p at strength 10) and a faint stroke of a nearby pattern (0.9 p + 0.1 n at
    # strength 1). Query: p at strength 1. Correlation picks the eye (the same pattern), distance the stroke.
    generator = torch.Generator().manual_seed(5)
    pattern = torch.randn(4, 3, 3, generator=generator)
    other = torch.randn(4, 3, 3, generator=generator)
    stroke = 0.9 * pattern + 0.1 * other * pattern.norm() / other.norm()
    style = torch.zeros(1, 4, 3, 9)
    style[0, :, :, 0:3], style[0, :, :, 6:9] = 10 * pattern, stroke
    query = pattern[None]
    eye, faint = 0, 6  # the style patches' indices (one row of 7)
    assert nearest_patches(query, style, metric="correlation").item() == eye
    assert nearest_patches(query, style, metric="distance").item() == faint


def test_an_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="metric"):
        nearest_patches(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), metric="cosine")


@pytest.mark.parametrize("max_scores", [1, 30, 1 << 24])
def test_ties_go_to_the_lowest_index_across_chunks(max_scores):
    # Integer-valued features make every score exact, so duplicated style patches tie exactly.
    torch.manual_seed(1)
    style = torch.randint(0, 3, (1, 2, 4, 12)).float()
    style[..., 6:] = style[..., :6]  # every patch of the left half reappears on the right
    query = torch.randint(0, 3, (1, 2, 5, 5)).float()
    found = nearest_patches(query, style, 3, 1, max_scores=max_scores)
    assert torch.equal(found, brute_force(query, style, 3, 1))
    cols = 12 - 2
    assert ((found % cols) < 6).all(), "a duplicate in a later band won a tie"


@pytest.mark.parametrize("metric", ["correlation", "distance"])
def test_style_eligibility_limits_candidates(metric):
    torch.manual_seed(2)
    query, style = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 9, 9)
    eligible = torch.zeros(49, dtype=torch.bool)
    eligible[torch.randperm(49)[:5]] = True
    found = nearest_patches(query, style, 3, 1, style_eligible=eligible, max_scores=16, metric=metric)
    assert eligible[found].all()
    assert torch.equal(found, brute_force(query, style, 3, 1, eligible, metric))


def direct_dots(query, style, q_index, s_index, size, stride):
    """<query patch q_index[i], style patch s_index[i, j]> from unfolded patches, in float64."""
    q = F.unfold(query.double(), size, stride=stride)[0].T
    s = F.unfold(style.double(), size, stride=stride)[0].T
    return (q[q_index][:, None, :] * s[s_index]).sum(-1)


@pytest.mark.parametrize("budget", [1, 500, 1 << 20])  # 1: one query per chunk; 500: chunks of a few queries
@pytest.mark.parametrize("stride", [1, 2])
def test_patch_dots_equal_products_of_unfolded_patches(budget, stride):
    # Non-square maps of different shapes; integer values, so every float32 sum is exact in any order.
    generator = torch.Generator().manual_seed(3)
    query = torch.randint(-3, 4, (1, 5, 11, 8), generator=generator).float()
    style = torch.randint(-3, 4, (1, 5, 9, 14), generator=generator).float()
    n_query = F.unfold(query, 3, stride=stride).shape[-1]
    n_style = F.unfold(style, 3, stride=stride).shape[-1]
    q_index = torch.randperm(n_query, generator=generator)[: n_query - 2]  # any order, not every patch
    s_index = torch.randint(0, n_style, (len(q_index), 6), generator=generator)  # duplicates included
    dots = _patch_dots(
        positions_last(query), (11, 8), q_index, positions_last(style), (9, 14), s_index, 3, stride, budget
    )
    assert dots.dtype == torch.float32
    assert torch.equal(dots.double(), direct_dots(query, style, q_index, s_index, 3, stride))


def test_patch_dots_of_real_valued_maps_match_float64():
    generator = torch.Generator().manual_seed(4)
    query, style = torch.randn(1, 16, 12, 10, generator=generator), torch.randn(1, 16, 13, 15, generator=generator)
    q_index = torch.arange(10 * 8)
    s_index = torch.randint(0, 11 * 13, (80, 9), generator=generator)
    dots = _patch_dots(positions_last(query), (12, 10), q_index, positions_last(style), (13, 15), s_index, 3, 1, 3000)
    torch.testing.assert_close(dots.double(), direct_dots(query, style, q_index, s_index, 3, 1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("length", [4 * 8 * 64, 4 * 8 * 64 + 3, 100, 8])  # two stages, then plain topk
@pytest.mark.parametrize("ties", [False, True])
def test_two_stage_top_k_finds_the_k_largest_scores(length, ties):
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(37, length, generator=generator)
    if ties:  # a few distinct values: many equal scores inside and across groups
        scores = torch.randint(0, 5, (37, length), generator=generator).float()
    values, columns = _top_candidates(scores, 8)
    expected = scores.topk(min(8, length), dim=1).values
    assert torch.equal(values.sort(1, descending=True).values, expected)
    assert torch.equal(scores.gather(1, columns), values)
    assert all(len(set(row)) == len(row) for row in columns.tolist())  # k distinct columns
