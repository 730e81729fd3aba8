"""Nearest style patch for every output patch, by normalised cross-correlation (Li & Wand 2016).

Score(i, j) = <q_i, s_j> / |s_j|: the cosine similarity up to the factor 1/|q_i|, which does not
change the best j for a given i. The search is exact over all (eligible) style patches and runs
in bands of grid rows, so at most ``max_scores`` similarities exist at any time, whatever the image
size. Ties go to the lowest style index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import patch_grid, patch_norms, patches

DEFAULT_MAX_SCORES = 1 << 24  # 64 MB of float32 similarities per block


def _band_rows(cols: int, max_patches: int) -> int:
    return max(1, max_patches // max(cols, 1))


@torch.no_grad()
def nearest_patches(
    query: Tensor,
    style: Tensor,
    size: int = 3,
    stride: int = 1,
    *,
    style_eligible: Tensor | None = None,
    max_scores: int = DEFAULT_MAX_SCORES,
) -> Tensor:
    """Index of the best style patch for each query patch, shape (N_query,), exact.

    ``style_eligible`` (N_style,) bool limits the candidates (a style mask); at least one must be True.
    """
    q_rows, q_cols = patch_grid(query.shape[-2], query.shape[-1], size, stride)
    s_rows, s_cols = patch_grid(style.shape[-2], style.shape[-1], size, stride)
    inverse_norm = 1.0 / patch_norms(style, size, stride).clamp_min(1e-8)
    if style_eligible is not None:
        inverse_norm = torch.where(style_eligible, inverse_norm, torch.full_like(inverse_norm, float("nan")))
    # Query bands of ~sqrt(max_scores) patches, style bands filling the rest of the budget.
    q_band = _band_rows(q_cols, int(max_scores**0.5))
    s_band = _band_rows(s_cols, max_scores // (q_band * q_cols))
    best_index = torch.empty(q_rows * q_cols, dtype=torch.long, device=query.device)
    for q_start in range(0, q_rows, q_band):
        q = patches(query, size, stride, slice(q_start, q_start + q_band))
        best = torch.full((q.shape[0],), -float("inf"), dtype=q.dtype, device=q.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for s_start in range(0, s_rows, s_band):
            s = patches(style, size, stride, slice(s_start, s_start + s_band))
            offset = s_start * s_cols
            scores = (q @ s.T) * inverse_norm[offset : offset + s.shape[0]]
            scores.nan_to_num_(nan=-float("inf"))  # ineligible style patches never win
            index = scores.argmax(dim=1)  # documented to return the first of equal maxima
            value = scores.gather(1, index[:, None])[:, 0]
            better = value > best  # strict: an earlier band keeps a tie
            best = torch.where(better, value, best)
            arg = torch.where(better, index + offset, arg)
        best_index[q_start * q_cols : q_start * q_cols + q.shape[0]] = arg
    return best_index


# name -> search function with the signature of ``nearest_patches``
MATCHERS = {"exact": nearest_patches}
