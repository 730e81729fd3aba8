"""The chunked nearest-patch search equals a brute-force search, chunk boundaries and ties included."""

import pytest
import torch
import torch.nn.functional as F

from fusion_core.matching import nearest_patches


def brute_force(query, style, size, stride, eligible=None):
    q = F.unfold(query, size, stride=stride)[0].T.double()
    s = F.unfold(style, size, stride=stride)[0].T.double()
    scores = q @ s.T / s.norm(dim=1).clamp_min(1e-8)
    if eligible is not None:
        scores[:, ~eligible] = -float("inf")
    return scores.argmax(dim=1)  # the first of equal maxima


@pytest.mark.parametrize("max_scores", [1, 7, 50, 1 << 24])  # 1 and 7 force one-row bands everywhere
@pytest.mark.parametrize("stride", [1, 2])
def test_chunked_search_equals_brute_force(max_scores, stride):
    torch.manual_seed(0)
    query, style = torch.randn(1, 5, 11, 9), torch.randn(1, 5, 10, 13)
    found = nearest_patches(query, style, 3, stride, max_scores=max_scores)
    assert torch.equal(found, brute_force(query, style, 3, stride))


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


def test_style_eligibility_limits_candidates():
    torch.manual_seed(2)
    query, style = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 9, 9)
    eligible = torch.zeros(49, dtype=torch.bool)
    eligible[torch.randperm(49)[:5]] = True
    found = nearest_patches(query, style, 3, 1, style_eligible=eligible, max_scores=16)
    assert eligible[found].all()
    assert torch.equal(found, brute_force(query, style, 3, 1, eligible))
