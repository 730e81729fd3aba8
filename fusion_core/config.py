"""Every default of the method in one place, and the progress record the optimiser reports.

Images are float tensors (1, 3, H, W), RGB in 0..1; masks are (H, W) in 0..1 (soft values allowed).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from types import SimpleNamespace

from torch import Tensor

from .errors import FusionError

# The Gram loss's layers: Gatys et al.'s, the first ReLU of every block. The paper's (PAPER_GLOBAL_LAYERS) stop at
# block 4 and so miss the style's largest forms; these give bolder strokes at the same content distance.
GLOBAL_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
PAPER_GLOBAL_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_2")
# "recolored": the content in the style's colours; "content": the content as it is; "random": noise (the paper)
INITS = ("recolored", "content", "random")
OPTIMIZERS = ("lbfgs", "adam")  # L-BFGS (the paper); Adam needs less memory and more iterations
COLOR_MODES = ("none", "luminance", "histogram")  # see colour.py
# Nearest-patch searches (matching.MATCHERS): projected candidates re-ranked exactly, or every style patch
MATCHER_NAMES = ("fast", "exact")
# What "nearest" means in the local term's search (matching.METRICS): feature distance, or the normalised
# cross-correlation of Li and Wand and the paper
MATCH_METRICS = ("distance", "correlation")
# Smallest style image (longest side, px) at which a coarse pyramid level uses the local term (stylize.styles_at_level)
LOCAL_MIN_STYLE_SIDE = 256


# The style terms' weights (a1, a2) each preset starts from; a weight the user gives wins (choices.term_weight).
# Ours take a3 (content_weight) at half the paper's and a2 at a quarter, against its a1: the local term's search
# looks at the content too (match_content) and for the nearest patch in feature distance (match_metric), so it
# holds faint texture to faint strokes, and a stronger pull of it makes the picture blander; the Gram term carries
# more of the style (docs/RESULTS.md, section 1).
PRESET_WEIGHTS: dict[str, dict[str, float]] = {
    "default": {"global": 20.0, "local": 2.5e-5},
    "paper": {"global": 20.0, "local": 1e-4},
}


@dataclass
class GlobalStyle:
    """Gram-matrix style loss (Gatys et al. 2016): colour, texture statistics, overall structure."""

    image: Tensor
    weight: float = PRESET_WEIGHTS["default"]["global"]  # a1
    layers: tuple[str, ...] = GLOBAL_LAYERS
    target_mask: Tensor | None = None  # where on the output this style applies (1 = here)
    style_mask: Tensor | None = None  # which part of the style image it draws from
    scale: float = 1.0  # style image size relative to the output: > 1 gives larger brush strokes
    blend: float = 1.0  # this style's part among the terms of its kind over the same region (choices.blend_shares)

    def feature_layers(self) -> tuple[str, ...]:
        return tuple(self.layers)

    def validate(self, name: str = "style") -> None:
        """Raise a FusionError naming ``name`` if a number is out of range (layer names are the network's to
        check)."""
        _check_weight(f"{name}.weight", self.weight)
        _check_weight(f"{name}.blend", self.blend)
        _check_scale(f"{name}.scale", self.scale)
        if not self.layers or isinstance(self.layers, str):
            raise FusionError(f"{name}.layers: give a tuple of at least one layer, got {self.layers!r}")


@dataclass
class LocalStyle:
    """MRF patch loss (Li & Wand 2016): every output patch pulled toward its nearest style patch."""

    image: Tensor
    weight: float = PRESET_WEIGHTS["default"]["local"]  # a2 (the paper's 1e-4: PRESET_WEIGHTS)
    layer: str = "relu3_1"
    patch_size: int = 3
    stride: int = 1
    target_mask: Tensor | None = None
    style_mask: Tensor | None = None
    scale: float = 1.0
    blend: float = 1.0  # as GlobalStyle's

    def feature_layers(self) -> tuple[str, ...]:
        return (self.layer,)

    def validate(self, name: str = "style") -> None:
        """Raise a FusionError naming ``name`` if a number is out of range."""
        _check_weight(f"{name}.weight", self.weight)
        _check_weight(f"{name}.blend", self.blend)
        _check_scale(f"{name}.scale", self.scale)
        _check_count(f"{name}.patch_size", self.patch_size)
        _check_count(f"{name}.stride", self.stride)


StyleTerm = GlobalStyle | LocalStyle


@dataclass
class Settings:
    """How to optimise: content term, pyramid, optimiser, reproducibility, reporting."""

    content_weight: float = 10.0  # a3 (the paper's 20: the paper preset)
    # Gatys et al.'s content layer; the paper's relu3_1 (the paper preset) holds the strokes' own layer to the photo
    # too, which costs style and, beside a plain Gatys run, structure (docs/RESULTS.md)
    content_layer: str = "relu4_2"
    size: int = 512  # longest side of the output, in pixels
    levels: int = 3  # coarse-to-fine pyramid levels, each twice the size of the one before
    iterations: int = 80  # optimiser iterations per level
    final_iterations: int = 30  # iterations at the last, largest level (0: ``iterations``); fewer saves most time
    init: str = "recolored"  # one of INITS; the paper starts from noise ("random")
    seed: int = 0
    optimizer: str = "lbfgs"  # one of OPTIMIZERS
    learning_rate: float | None = None  # None: 1 for L-BFGS, 0.02 for Adam (the image is in 0..1)
    tv_weight: float = 10.0  # total-variation smoothing of pixel noise; the paper has none (0)
    color: str = "none"  # one of COLOR_MODES: "luminance" keeps the content's chroma, "histogram" recolours the styles
    local_all_levels: bool = False  # the local term on every pyramid level (the paper), not only the fine ones
    # The content's share in what the local term's nearest style patches are searched for, from 0 (the output's
    # features alone: the paper) to 1 (the content's alone); losses.PatchLoss says why
    match_content: float = 0.5
    # "distance": the nearest style patch in feature distance, so a faint patch of the output is matched to a faint
    # one; "correlation" (the paper's normalised cross-correlation) ignores strength and pulls faint texture to the
    # painting's most contrasted detail (an eye) at full strength (matching.py, docs/method.md)
    match_metric: str = "distance"
    global_layers: tuple[str, ...] | None = None  # if given, every GlobalStyle's layers (the paper preset's)
    history_size: int = 20  # L-BFGS memory; each entry holds two image-sized vectors
    matcher: str = "fast"  # nearest-patch search, one of MATCHER_NAMES
    rematch_every: int = 1  # search nearest style patches every n-th iteration (1: every evaluation)
    # 16-bit VGG pass and patch search where the hardware has it: float16 on CUDA, bfloat16 on CPUs with
    # AVX512-BF16 / AMX; losses, Grams, image and L-BFGS state stay float32 (precision.py)
    mixed_precision: bool = True
    preview_every: int = 0  # attach the current image to every n-th progress report (0: never)
    # Evaluate each level in tiles of at most this many px, the deep layers whole where they fit (exact, tiling.py);
    # 0: only a level that would not fit in the memory available, as memory.plan_level chooses
    tile: int = 0
    # The most memory the run may leave the process holding on its device, in GB: the levels are planned (whole or in
    # tiles, the L-BFGS history) to fit it beside what the process holds already (memory.held_bytes: on a CPU the
    # process's resident memory, torch itself included). 0: what the device has free
    max_memory: float = 0.0

    def level_iterations(self, level: int) -> int:
        """Iterations at 0-based pyramid ``level``."""
        return self.final_iterations if level == self.levels - 1 and self.final_iterations > 0 else self.iterations

    def total_steps(self) -> int:
        """Iterations over all levels."""
        return sum(self.level_iterations(level) for level in range(self.levels))

    def validate(self) -> None:
        """Raise a FusionError naming the first field out of range and what it accepts (layer names are the
        network's to check)."""
        for name in ("size", "levels", "iterations", "history_size", "rematch_every"):
            _check_count(name, getattr(self, name))
        for name, choices in (
            ("init", INITS),
            ("optimizer", OPTIMIZERS),
            ("color", COLOR_MODES),
            ("matcher", MATCHER_NAMES),
            ("match_metric", MATCH_METRICS),
        ):
            if getattr(self, name) not in choices:
                raise FusionError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")
        for name in ("mixed_precision", "local_all_levels"):  # a string such as "false" would read as on
            if not isinstance(getattr(self, name), bool):
                raise FusionError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        rate = self.learning_rate
        if rate is not None and not (isinstance(rate, (int, float)) and 0 < rate < math.inf):
            raise FusionError(f"learning_rate: expected a number > 0 or None, got {rate!r}")
        _check_weight("content_weight", self.content_weight)
        _check_weight("tv_weight", self.tv_weight)
        memory = self.max_memory
        if isinstance(memory, bool) or not (isinstance(memory, (int, float)) and 0 <= memory < math.inf):
            raise FusionError(f"max_memory: expected a number of GB >= 0 (0: what the device has), got {memory!r}")
        share = self.match_content
        if isinstance(share, bool) or not (isinstance(share, (int, float)) and 0 <= share <= 1):
            raise FusionError(f"match_content: expected a number from 0 to 1, got {share!r}")
        for name in ("preview_every", "tile", "final_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FusionError(f"{name}: expected a whole number >= 0, got {value!r}")
        if self.global_layers is not None and (not self.global_layers or isinstance(self.global_layers, str)):
            raise FusionError(f"global_layers: give a tuple of at least one layer, got {self.global_layers!r}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FusionError(f"{name}: expected a whole number >= 1, got {value!r}")


def _check_weight(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise FusionError(f"{name}: expected a finite number >= 0, got {value!r}")


def _check_scale(name: str, value: object) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.05 <= value <= 8):
        raise FusionError(f"{name}: expected a number from 0.05 to 8, got {value!r}")


def defaults(cls: type) -> SimpleNamespace:
    """The default of every field of dataclass ``cls`` (fields without one are left out), read from the class
    itself, so callers (the CLI, the nodes) need not build a dummy instance."""
    found = {}
    for item in fields(cls):
        if item.default is not MISSING:
            found[item.name] = item.default
        elif item.default_factory is not MISSING:
            found[item.name] = item.default_factory()
    return SimpleNamespace(**found)


# The paper's own set-up, as one switch (``--preset paper``, the node's ``preset``): the settings in which our
# defaults depart from it, set back. Everything else (layers, weights, pyramid) is the paper's in both.
PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    "paper": {
        "init": "random",
        "tv_weight": 0.0,
        "local_all_levels": True,
        "global_layers": PAPER_GLOBAL_LAYERS,
        "match_content": 0.0,
        "match_metric": "correlation",
        "content_layer": "relu3_1",
        "content_weight": 20.0,
        "final_iterations": 0,
        "iterations": 100,
    },
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
    tiles: int = 1  # tiles the level is evaluated in (tiling.py); 1: whole
    history: int = 0  # the L-BFGS history kept at this level (0 with Adam)
    split: str | None = None  # tiled: the layer after which the network runs on the whole map (tiling.py)

    def plan(self) -> str:
        """How the level is evaluated, in words: "9 tiles (layers after pool3 whole), L-BFGS history 5"."""
        if self.tiles <= 1:
            return f"whole, L-BFGS history {self.history}"
        whole = f" (layers after {self.split} whole)" if self.split else ""
        return f"{self.tiles} tiles{whole}, L-BFGS history {self.history}"
