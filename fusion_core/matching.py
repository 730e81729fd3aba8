"""Nearest style patch for every output patch (Li & Wand 2016), by one of two scores (``metric``):

- "correlation", normalised cross-correlation, Li & Wand's and the paper's: Score(i, j) = <q_i, s_j> / |s_j|, the
  cosine similarity up to the factor 1/|q_i|, which does not change the best j for a given i. It ignores how strong
  a patch is: a faint patch of grass picks the style patch whose *pattern* it shares, often the painting's most
  contrasted detail (a pupil, a nostril), and the loss then pulls it to that patch at full strength.
- "distance", the squared feature distance |q_i - s_j|^2: Score(i, j) = <q_i, s_j> - |s_j|^2 / 2, the same order
  (|q_i|^2 is the same for every j). A faint patch picks a faint style patch of its pattern; the painting's motifs
  are drawn only where the output is as strong there (docs/method.md).

A matcher (the ``Matcher`` protocol) is a class in ``MATCHERS``, built once per style map (pyramid level) as
``cls(style, size, stride, style_eligible, metric=...)`` and called as ``search(query, previous) -> indices``
(N_query,) long, where ``previous`` is the last match for the same grid or None:

- ``ExactSearch`` ("exact") scores every (eligible) style patch at every call (``nearest_patches``),
  in bands, so at most ``max_scores`` similarities exist at any time; ``previous`` is ignored.
  Ties go to the lowest style index. Always float32.
- ``ProjectedSearch`` ("fast", the default) runs ``full_search`` at the first and every
  ``FULL_SEARCH_EVERY``-th call: a cheap candidate search in a 64-dimensional projection (PCA of the
  style patches), then the 8 best candidates re-ranked by their exact score (either metric). At 512 px (relu3_1:
  ~16k query x ~16k style patches of 2304 values) the candidate scores cost 1/36 of the exact ones,
  and the patch found scores within 0.1% of the best on average (BENCHMARKS.md has the measurements).
  Between two full searches it only ``propagate``s: each output patch re-ranks, by the exact score,
  its previous match, its neighbours' matches shifted by one position (PatchMatch, Barnes et al.
  2009), two random patches near its match and the candidates of the last full search. The output
  changes little between two L-BFGS iterations, so this keeps the matches of a full search at a cost
  linear in the number of patches.

Portability: only dense operations every backend has (matmul, bmm, index_select, topk), memory
bounded per chunk whatever the image size, and no host synchronisation in the searches (loop bounds
come from shapes, never from tensor values), so a GPU never waits for the host between chunks.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import precision
from .functional import patch_grid, patch_norms, patch_starts, patches, positions_last

DEFAULT_MAX_SCORES = 1 << 24  # 64 MB of float32 similarities per block
FAST_DIMS = 64  # projection dimensions of the fast search (of C * size^2 = 2304 at relu3_1)
FAST_CANDIDATES = 8  # style patches per query re-ranked exactly
PCA_SAMPLES = 1024  # style patches the projection is fitted on
FULL_SEARCH_EVERY = 3  # fast matcher: a full candidate search every n-th match, propagation between
TOPK_GROUP = 64  # projected scores per group of the two-stage top-k (``_top_candidates``)
_NO_INDEX = torch.iinfo(torch.long).max
METRICS = ("distance", "correlation")  # see the module's docstring; config.MATCH_METRICS names them for Settings


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")


def _score_terms(norms: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Per style patch of norm ``norms``, the (scale, shift) of its exact score <q, s> * scale + shift under
    ``metric``: correlation 1/|s| and 0, distance 1 and -|s|^2/2."""
    if metric == "correlation":
        return 1.0 / norms.clamp_min(1e-8), torch.zeros_like(norms)
    return torch.ones_like(norms), -0.5 * norms.square()


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
    metric: str = "correlation",
) -> Tensor:
    """Index of the best style patch for each query patch by ``metric`` (module docstring), shape (N_query,), exact.

    ``style_eligible`` (N_style,) bool limits the candidates (a style mask); at least one must be True.
    """
    _check_metric(metric)
    with precision.float32_region(query.device):
        query, style = query.float(), style.float()
        q_rows, q_cols = patch_grid(query.shape[-2], query.shape[-1], size, stride)
        s_rows, s_cols = patch_grid(style.shape[-2], style.shape[-1], size, stride)
        scale, shift = _score_terms(patch_norms(style, size, stride), metric)
        if style_eligible is not None:
            shift = torch.where(style_eligible, shift, torch.full_like(shift, float("nan")))
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
                band = slice(offset, offset + s.shape[0])
                scores = torch.addcmul(shift[band], q @ s.T, scale[band])
                scores.nan_to_num_(nan=-float("inf"))  # ineligible style patches never win
                index = scores.argmax(dim=1)  # documented to return the first of equal maxima
                value = scores.gather(1, index[:, None])[:, 0]
                better = value > best  # strict: an earlier band keeps a tie
                best = torch.where(better, value, best)
                arg = torch.where(better, index + offset, arg)
            best_index[q_start * q_cols : q_start * q_cols + q.shape[0]] = arg
    return best_index


class Matcher(Protocol):
    """Something that finds the nearest style patches of a query map: a matcher of ``MATCHERS``, built once per style
    map (pyramid level) as ``cls(style, size, stride, style_eligible)``.

    ``search(query, previous)`` is the search to run between optimiser iterations: ``full_due(previous)`` says
    whether it is a full one (and counts it), then ``full_search`` or ``propagate`` (a cheaper step from
    ``previous``, the last matches of the same grid) runs; ``last_full`` says which the last call was. ``pool``
    holds the candidates of the last full search that ``propagate`` re-ranks (None where there are none);
    ``keep_candidates`` sets them when a full search was made in parts (tiling.TiledMatch)."""

    last_full: bool
    pool: Tensor | None

    def __call__(self, query: Tensor, previous: Tensor | None = None) -> Tensor: ...

    def full_due(self, previous: Tensor | None) -> bool: ...

    def full_search(self, query: Tensor, previous: Tensor | None = None) -> Tensor: ...

    def propagate(self, query: Tensor, previous: Tensor, pool: Tensor | None = None) -> Tensor: ...

    def keep_candidates(self, pool: Tensor) -> None: ...


class ExactSearch:
    """The "exact" matcher: ``nearest_patches`` over every eligible style patch at every call.

    Holds nothing but its arguments: each call is a full search from scratch and ignores ``previous``; there are no
    candidates to keep and no propagation."""

    last_full = True  # every call is a full search
    pool = None

    def __init__(
        self,
        style: Tensor,
        size: int = 3,
        stride: int = 1,
        style_eligible: Tensor | None = None,
        *,
        metric: str = "correlation",
        max_scores: int = DEFAULT_MAX_SCORES,
    ) -> None:
        _check_metric(metric)
        if style_eligible is not None and not bool(style_eligible.any()):  # once per level, not per search
            raise ValueError("style_eligible: no style patch is eligible")
        self.style, self.size, self.stride, self.metric = style.detach(), size, stride, metric
        self.style_eligible, self.max_scores = style_eligible, max_scores

    def __call__(self, query: Tensor, previous: Tensor | None = None) -> Tensor:
        return self.full_search(query, previous)

    def full_due(self, previous: Tensor | None) -> bool:
        return True

    def full_search(self, query: Tensor, previous: Tensor | None = None) -> Tensor:
        return nearest_patches(
            query,
            self.style,
            self.size,
            self.stride,
            style_eligible=self.style_eligible,
            max_scores=self.max_scores,
            metric=self.metric,
        )

    def propagate(self, query: Tensor, previous: Tensor, pool: Tensor | None = None) -> Tensor:
        raise NotImplementedError("the exact search never propagates: full_due is always True")

    def keep_candidates(self, pool: Tensor) -> None:
        raise NotImplementedError("the exact search keeps no candidates")


def _gather_patches(rows: Tensor, shape: tuple[int, int], index: Tensor, size: int, stride: int) -> Tensor:
    """Patches number ``index`` of a ``positions_last`` map of spatial ``shape``, as rows (len(index),
    C * size^2) in ``F.unfold`` order."""
    start = patch_starts(index, shape, size, stride)
    parts = [rows.index_select(0, start + dy * shape[1] + dx) for dy in range(size) for dx in range(size)]
    return torch.stack(parts, 2).flatten(1)  # (N, C, size^2) -> (N, C * size^2)


def _patch_offsets(width: int, size: int, device: torch.device) -> Tensor:
    """Flat offsets (size^2,) of a patch's positions from its top-left one, row-major, on a map ``width`` wide.
    Built on the device (no host-to-device copy, which would wait for the device's queue)."""
    steps = torch.arange(size, device=device)
    return (steps[:, None] * width + steps[None, :]).flatten()


def _patch_dots(
    query: Tensor,
    q_shape: tuple[int, int],
    q_index: Tensor,
    style: Tensor,
    s_shape: tuple[int, int],
    s_index: Tensor,
    size: int,
    stride: int,
    budget: int,
) -> Tensor:
    """<query patch q_index[i], style patch s_index[i, j]> for (n,) and (n, k) indices: (n, k).

    ``query`` and ``style`` are maps in ``positions_last`` layout of spatial ``q_shape`` and ``s_shape``.
    Chunks of m queries gather their k candidates' whole patches, at most ``budget`` values, into one
    (m, k, size^2 * C) buffer reused by every chunk, and one batched matrix product takes the m x k dot
    products. The chunk size follows from the shapes alone, so the loop never waits for the device.
    """
    n, k = s_index.shape
    channels, dims = query.shape[1], size * size * query.shape[1]
    chunk = max(1, min(n, budget // max(k * dims, 1)))
    q_offsets = _patch_offsets(q_shape[1], size, query.device)
    s_offsets = _patch_offsets(s_shape[1], size, style.device)
    q_starts = patch_starts(q_index, q_shape, size, stride)[:, None]  # index arithmetic once, not per chunk
    s_starts = patch_starts(s_index, s_shape, size, stride)[..., None]
    # Reused buffers: a fresh multi-megabyte block per chunk costs the CPU more than filling it.
    q_buffer = query.new_empty(chunk * size * size, channels)
    s_buffer = style.new_empty(chunk * k * size * size, channels)
    dots = query.new_empty(n, 1, k)
    for start in range(0, n, chunk):
        q_rows = (q_starts[start : start + chunk] + q_offsets).flatten()
        m = q_rows.shape[0] // (size * size)
        q = torch.index_select(query, 0, q_rows, out=q_buffer[: m * size * size]).view(m, 1, dims)
        s_rows = (s_starts[start : start + chunk] + s_offsets).flatten()
        s = torch.index_select(style, 0, s_rows, out=s_buffer[: m * k * size * size]).view(m, k, dims)
        # (m, 1, D) @ (m, D, k), the candidates as the transposed operand: several times faster on our CPU
        # than (m, k, D) @ (m, D, 1), whose batched matrix-vector products the CPU libraries run slowly.
        dots[start : start + m] = torch.bmm(q, s.transpose(1, 2))
    return dots.view(n, k)


class ProjectedSearch:
    """The "fast" matcher, prepared for one style map (see ``projected_nearest_patches``).

    Preparation fits the projection: the top ``dims`` principal directions of the style patches
    (uncentred, since the score is an uncentred inner product), from ``samples`` patches drawn with
    a fixed seed; and projects every eligible style patch once: divided by its norm for "correlation"; for
    "distance" divided by the style patches' mean norm (the unit that keeps 16-bit scores in range), with the
    score's -|s|^2 / 2 in that unit kept beside it.

    A call runs ``full_search`` at the first and every ``FULL_SEARCH_EVERY``-th call (or when there is
    no ``previous`` match), ``propagate`` otherwise.
    """

    def __init__(
        self,
        style: Tensor,
        size: int = 3,
        stride: int = 1,
        style_eligible: Tensor | None = None,
        *,
        metric: str = "correlation",
        dims: int = FAST_DIMS,
        candidates: int = FAST_CANDIDATES,
        samples: int = PCA_SAMPLES,
        max_scores: int = DEFAULT_MAX_SCORES,
        gather_budget: int | None = None,
    ) -> None:
        _check_metric(metric)
        with torch.no_grad(), precision.float32_region(style.device):
            self.style, self.size, self.stride, self.max_scores = style.float(), size, stride, max_scores
            self.metric = metric
            # values per chunk of gathered style patches in the exact re-ranking: by device (precision.py)
            self.gather_budget = gather_budget or precision.gather_budget(style.device)
            norms = patch_norms(self.style, size, stride)
            eligible = torch.ones_like(norms, dtype=torch.bool) if style_eligible is None else style_eligible
            self.eligible = eligible.nonzero()[:, 0]  # style index of each row of ``projected`` (once per level)
            if len(self.eligible) == 0:
                raise ValueError("style_eligible: no style patch is eligible")
            self.candidates = min(candidates, len(self.eligible))
            self.scale, self.shift = _score_terms(norms, metric)  # the exact score, as in ``nearest_patches``
            generator = torch.Generator().manual_seed(0)
            pick = torch.randperm(len(self.eligible), generator=generator)[:samples].to(self.eligible.device)
            self.style_rows, self.style_shape = positions_last(self.style), tuple(self.style.shape[-2:])
            sample = _gather_patches(self.style_rows, self.style_shape, self.eligible[pick], size, stride)  # (n, D)
            basis = _principal_directions(sample, dims, generator)  # (D, d)
            # A projection of every patch of a map is a convolution with the directions as kernels.
            self.kernels = basis.T.reshape(-1, self.style.shape[1], size, size).contiguous()
            projected = self._project(self.style)[self.eligible]
            if metric == "correlation":
                self.projected = projected * self.scale[self.eligible, None]  # (N_eligible, d)
            else:
                # the unit of the projected scores: the eligible style patches' mean norm
                self.unit = norms[self.eligible].mean().clamp_min(1e-8)
                self.projected = projected / self.unit
                self.projected_shift = -0.5 * (norms[self.eligible] / self.unit).square()  # (N_eligible,)
            self.is_eligible = eligible
            self.grid = patch_grid(*self.style_shape, size, stride)
            self.pool: Tensor | None = None  # (N_query, candidates): the last full search's candidates
            self.generator = torch.Generator(device=self.style.device).manual_seed(0)  # random search
            self.matches = 0
            self.last_full = False  # whether the last call was a full search

    def _project(self, features: Tensor) -> Tensor:
        return positions_last(F.conv2d(features, self.kernels, stride=self.stride))  # (N, d)

    @torch.no_grad()
    def __call__(self, query: Tensor, previous: Tensor | None = None) -> Tensor:
        """The search to run between optimiser iterations: ``full_search`` at the first and every
        ``FULL_SEARCH_EVERY``-th call, ``propagate`` from ``previous`` otherwise."""
        self.last_full = self.full_due(previous)
        return self.full_search(query, previous) if self.last_full else self.propagate(query, previous)

    def full_due(self, previous: Tensor | None) -> bool:
        """Whether this match is a full search (else a propagation from ``previous``); counts the match. A match
        made in parts (tiling.py) asks once and runs the chosen search on every part."""
        full = previous is None or self.pool is None or self.matches % FULL_SEARCH_EVERY == 0
        self.matches += 1
        return full

    @torch.no_grad()
    def full_search(self, query: Tensor, previous: Tensor | None = None) -> Tensor:
        """Best style index per query patch among the projected search's candidates. ``previous`` (N_query,),
        an earlier match for the same grid, joins each query's candidates, so a re-match never picks a patch
        worse than the last one."""
        with precision.float32_region(query.device):
            query = query.float()
            projected = self._project(query)
            if self.metric == "correlation":
                # Each query row scaled to unit length: the order within a row is unchanged and the
                # scores stay in [-1, 1], safe for 16-bit floats under autocast.
                projected = projected / projected.norm(dim=1, keepdim=True).clamp_min(1e-8)
            else:
                # the style's unit: the scores are then of the order of 1, safe for 16-bit floats too
                projected = projected / self.unit
            query_rows, q_shape = positions_last(query), tuple(query.shape[-2:])
        n_query, n_style = projected.shape[0], self.projected.shape[0]
        s_band = min(n_style, max(self.candidates, self.max_scores // 256))
        if s_band >= TOPK_GROUP:
            s_band -= s_band % TOPK_GROUP  # whole groups for ``_top_candidates``; the last band may be shorter
        q_band = max(1, self.max_scores // s_band)
        pool = []
        for q_start in range(0, n_query, q_band):
            q = projected[q_start : q_start + q_band]
            top_score = top_index = None
            for s_start in range(0, n_style, s_band):
                scores = q @ self.projected[s_start : s_start + s_band].T  # 16-bit under autocast
                if self.metric == "distance":
                    scores = scores.float() + self.projected_shift[s_start : s_start + s_band]
                score, index = _top_candidates(scores, self.candidates)
                score, index = score.float(), index + s_start
                if top_score is not None:
                    score, index = torch.cat([top_score, score], 1), torch.cat([top_index, index], 1)
                    keep = score.topk(self.candidates, dim=1, sorted=False).indices
                    score, index = score.gather(1, keep), index.gather(1, keep)
                top_score, top_index = score, index
            pool.append(self.eligible[top_index])
        self.pool = torch.cat(pool)
        candidates = self.pool if previous is None else torch.cat([self.pool, previous[:, None]], 1)
        # One re-ranking for all bands: its gather buffers are allocated once, not once per band.
        return self._best_of(query_rows, q_shape, candidates)

    def keep_candidates(self, pool: Tensor) -> None:
        """The candidates (N_query, candidates) of a full search made in parts, for the propagations that follow."""
        self.pool = pool

    def _best_of(self, query_rows: Tensor, q_shape: tuple[int, int], candidates: Tensor) -> Tensor:
        """Of each row of ``candidates`` (n, k), one per query patch, the one with the best exact score; of equal
        scores the lowest style index, as the exact search does."""
        with precision.float32_region(query_rows.device):
            q_index = torch.arange(candidates.shape[0], device=query_rows.device)
            exact = _patch_dots(
                query_rows,
                q_shape,
                q_index,
                self.style_rows,
                self.style_shape,
                candidates,
                self.size,
                self.stride,
                self.gather_budget,
            )
            exact = torch.addcmul(self.shift[candidates], exact, self.scale[candidates])
            tied = exact == exact.max(1, keepdim=True).values
            return candidates.masked_fill(~tied, _NO_INDEX).amin(1)

    @torch.no_grad()
    def propagate(self, query: Tensor, previous: Tensor, pool: Tensor | None = None) -> Tensor:
        """Best of a few candidates per query patch, by the exact score (one PatchMatch round):
        ``previous``, the neighbours' matches shifted to this position, two random style patches within a
        quarter and a sixteenth of the style map around the previous match, and the last full search's
        candidates (``pool``, by default those it kept for the whole grid). Never worse than ``previous``;
        ineligible candidates are replaced by ``previous``."""
        with precision.float32_region(query.device):
            query = query.float()
            q_shape = tuple(query.shape[-2:])
            q_rows, q_cols = patch_grid(*q_shape, self.size, self.stride)
            s_rows, s_cols = self.grid
            if previous.shape != (q_rows * q_cols,):
                raise ValueError(f"previous: expected {q_rows * q_cols} indices for this query, got {previous.shape}")
            match = previous.view(q_rows, q_cols)
            row, col = match // s_cols, match % s_cols
            found = [previous]
            # A neighbour at (dy, dx) matched (r, c): this patch's candidate is (r - dy, c - dx).
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                n_row = _shift(row, dy, dx) - dy
                n_col = _shift(col, dy, dx) - dx
                found.append((n_row.clamp(0, s_rows - 1) * s_cols + n_col.clamp(0, s_cols - 1)).flatten())
            for fraction in (4, 16):
                radius = max(1, max(s_rows, s_cols) // fraction)
                jitter = torch.randint(
                    -radius, radius + 1, (2, q_rows, q_cols), generator=self.generator, device=self.style.device
                ).to(query.device)
                r = (row + jitter[0]).clamp(0, s_rows - 1)
                c = (col + jitter[1]).clamp(0, s_cols - 1)
                found.append((r * s_cols + c).flatten())
            candidates = torch.stack(found, 1)
            candidates = torch.where(self.is_eligible[candidates], candidates, previous[:, None])
            pool = self.pool if pool is None else pool
            if pool is not None and pool.shape[0] == candidates.shape[0]:
                candidates = torch.cat([candidates, pool], 1)
            return self._best_of(positions_last(query), q_shape, candidates)  # chunked in _patch_dots


def _top_candidates(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest scores of each row of ``scores`` (m, L), unsorted, and their columns: (m, k) each.

    Long rows take two stages: the k groups of ``TOPK_GROUP`` consecutive scores with the largest maxima
    hold a set of k largest scores (any score outside them is at most the smallest of those k maxima, each a
    score inside), so a pass of maxima and two short top-ks replace a top-k over the whole row, 2x faster
    on our CPU. Of equal scores either stage may pick any, as ``torch.topk`` may.
    """
    m, length = scores.shape
    if length % TOPK_GROUP or length < 4 * k * TOPK_GROUP:
        found = scores.topk(min(k, length), dim=1, sorted=False)
        return found.values, found.indices
    maxima = scores.view(m, length // TOPK_GROUP, TOPK_GROUP).amax(2)
    groups = maxima.topk(k, dim=1, sorted=False).indices  # (m, k)
    columns = (groups[:, :, None] * TOPK_GROUP + torch.arange(TOPK_GROUP, device=scores.device)).flatten(1)
    found = scores.gather(1, columns).topk(k, dim=1, sorted=False)
    return found.values, columns.gather(1, found.indices)


def _shift(grid: Tensor, dy: int, dx: int) -> Tensor:
    """``grid`` read at (y + dy, x + dx) for every (y, x), the nearest edge value where that is outside."""
    rows = (torch.arange(grid.shape[0], device=grid.device) + dy).clamp(0, grid.shape[0] - 1)
    cols = (torch.arange(grid.shape[1], device=grid.device) + dx).clamp(0, grid.shape[1] - 1)
    return grid[rows][:, cols]


def _principal_directions(sample: Tensor, dims: int, generator: torch.Generator) -> Tensor:
    """Orthonormal (D, d) basis of the top ``dims`` uncentred principal directions of the rows of ``sample``.

    A randomised subspace iteration (Halko et al. 2011): a few products with the sample and one small
    eigenproblem, rather than a full (D, D) or (n, n) one. With ``dims`` >= D it is a basis of the whole
    space, so the projection loses nothing. Computed on the CPU whatever the device: the sample is small (a
    few MB), and QR and the symmetric eigensolver are linear algebra that MPS lacks.
    """
    d_full = sample.shape[1]
    x = sample.cpu()
    x = x / x.norm(dim=1).max().clamp_min(1e-30)  # a scale that float32 squares comfortably
    width = min(dims + 16, d_full)  # a few extra directions make the top ``dims`` accurate
    basis = torch.randn(d_full, width, generator=generator)
    for _ in range(2):
        basis = torch.linalg.qr(x.T @ (x @ basis)).Q
    projected = x @ basis
    values, vectors = torch.linalg.eigh(projected.T @ projected)
    return (basis @ vectors.flip(1)[:, :dims]).to(sample.device)


def projected_nearest_patches(
    query: Tensor,
    style: Tensor,
    size: int = 3,
    stride: int = 1,
    *,
    style_eligible: Tensor | None = None,
    max_scores: int = DEFAULT_MAX_SCORES,
    dims: int = FAST_DIMS,
    candidates: int = FAST_CANDIDATES,
    metric: str = "correlation",
) -> Tensor:
    """Index of a near-best style patch for each query patch by ``metric``, shape (N_query,): one fast full search.

    1. Candidates: patches projected to ``dims`` dimensions (PCA of the style patches); the
       ``candidates`` style patches with the best projected score (<Pq, Ps>/|s|, or <Pq, Ps> - |s|^2/2) per
       query are kept. Under autocast (mixed precision) this one product runs in 16 bits.
    2. Re-ranking: the exact score (<q, s>/|s| or <q, s> - |s|^2/2) of each candidate, read from the feature maps in
       float32; the best wins. With ``candidates`` >= the number of style patches this is the exact
       search; a wrong pick can only be a patch whose true score is close to the best.
    """
    search = ProjectedSearch(
        style, size, stride, style_eligible, metric=metric, dims=dims, candidates=candidates, max_scores=max_scores
    )
    return search.full_search(query)


# name (config.MATCHER_NAMES) -> matcher class (a ``Matcher``)
MATCHERS: dict[str, type[Matcher]] = {"exact": ExactSearch, "fast": ProjectedSearch}
