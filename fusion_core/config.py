"""Every default of the method in one place, and the progress record the optimiser reports.

Images are float tensors (1, 3, H, W), RGB in 0..1; masks are (H, W) in 0..1 (soft values allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .errors import FusionError

# The Gram loss's layers: Gatys et al.'s, the first ReLU of every block. The paper's (PAPER_GLOBAL_LAYERS) stop at
# block 4 and so miss the style's largest forms; these give bolder strokes at the same content distance.
GLOBAL_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
PAPER_GLOBAL_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_2")
# "recolored": the content in the style's colours; "content": the content as it is; "random": noise (the paper)
INITS = ("recolored", "content", "random")
# Smallest style image (longest side, px) at which a coarse pyramid level uses the local term (stylize.styles_at_level)
LOCAL_MIN_STYLE_SIDE = 256


@dataclass
class GlobalStyle:
    """Gram-matrix style loss (Gatys et al. 2016): colour, texture statistics, overall structure."""

    image: Tensor
    weight: float = 20.0  # a1
    layers: tuple[str, ...] = GLOBAL_LAYERS
    target_mask: Tensor | None = None  # where on the output this style applies (1 = here)
    style_mask: Tensor | None = None  # which part of the style image it draws from
    scale: float = 1.0  # style image size relative to the output: > 1 gives larger brush strokes


@dataclass
class LocalStyle:
    """MRF patch loss (Li & Wand 2016): every output patch pulled toward its nearest style patch."""

    image: Tensor
    weight: float = 1e-4  # a2
    layer: str = "relu3_1"
    patch_size: int = 3
    stride: int = 1
    target_mask: Tensor | None = None
    style_mask: Tensor | None = None
    scale: float = 1.0


StyleTerm = GlobalStyle | LocalStyle


@dataclass
class Settings:
    """How to optimise: content term, pyramid, optimiser, reproducibility, reporting."""

    content_weight: float = 20.0  # a3
    content_layer: str = "relu3_1"
    size: int = 512  # longest side of the output, in pixels
    levels: int = 3  # coarse-to-fine pyramid levels, each twice the size of the one before
    iterations: int = 100  # optimiser iterations per level
    init: str = "recolored"  # one of INITS; the paper starts from noise ("random")
    seed: int = 0
    optimizer: str = "lbfgs"  # "lbfgs" (the paper) or "adam" (less memory, needs more iterations)
    learning_rate: float | None = None  # None: 1 for L-BFGS, 0.02 for Adam (the image is in 0..1)
    tv_weight: float = 10.0  # total-variation smoothing of pixel noise; the paper has none (0)
    color: str = "none"  # "none", "luminance" (keep the content's chroma) or "histogram" (recolour the styles)
    local_all_levels: bool = False  # the local term on every pyramid level (the paper), not only the fine ones
    global_layers: tuple[str, ...] | None = None  # if given, every GlobalStyle's layers (the paper preset's)
    history_size: int = 20  # L-BFGS memory; each entry holds two image-sized vectors
    matcher: str = "fast"  # nearest-patch search: "fast" (projected candidates, re-ranked exactly) or "exact"
    rematch_every: int = 1  # search nearest style patches every n-th iteration (1: every evaluation)
    # 16-bit VGG pass and patch search where the hardware has it: float16 on CUDA, bfloat16 on CPUs with
    # AVX512-BF16 / AMX; losses, Grams, image and L-BFGS state stay float32 (precision.py)
    mixed_precision: bool = True
    preview_every: int = 0  # attach the current image to every n-th progress report (0: never)


# The paper's own set-up, as one switch (``--preset paper``, the node's ``preset``): the settings in which our
# defaults depart from it, set back. Everything else (layers, weights, pyramid) is the paper's in both.
PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    "paper": {"init": "random", "tv_weight": 0.0, "local_all_levels": True, "global_layers": PAPER_GLOBAL_LAYERS},
}


def preset_fields(name: str) -> dict[str, object]:
    """The Settings fields that preset ``name`` ("default" or "paper") sets."""
    if name not in PRESETS:
        raise FusionError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset(name: str, **changes: object) -> Settings:
    """Settings of preset ``name`` ("default" or "paper"), with ``changes`` on top."""
    return Settings(**{**preset_fields(name), **changes})


@dataclass(frozen=True)
class Progress:
    """One optimiser iteration, as reported to ``on_progress``."""

    level: int  # 1-based pyramid level
    levels: int
    iteration: int  # 1-based, within the level
    iterations: int
    step: int  # 1-based over all levels
    steps: int
    losses: dict[str, float] = field(default_factory=dict)  # weighted terms and "total"
    image: Tensor | None = None  # (1, 3, H, W) in 0..1 when a preview is due
