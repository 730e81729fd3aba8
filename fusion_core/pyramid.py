"""Image sizes for the coarse-to-fine pyramid."""

from __future__ import annotations


def fit_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) scaled so the longer side is ``longest``, aspect ratio kept."""
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def level_shapes(height: int, width: int, size: int, levels: int) -> list[tuple[int, int]]:
    """Output shape of each level, coarsest first; each level is twice the one before, the last ``size``."""
    return [fit_longest(height, width, max(1, round(size / 2 ** (levels - 1 - i)))) for i in range(levels)]
