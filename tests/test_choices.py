"""User choices into Settings and terms (fusion_core/choices.py), the one place the command line and the nodes share:
the preset rule, the blend shares against a direct computation, the layers a network lacks."""

from __future__ import annotations

import pytest
import torch
from helpers import smooth_image, tiny_vgg

from fusion_core import FusionError, GlobalStyle, LocalStyle, Progress, Settings
from fusion_core.choices import (
    BLEND_GRID,
    blend_shares,
    chosen_fields,
    missing_layers,
    preset_terms,
    settings_for,
    term_weight,
)
from fusion_core.config import PAPER_GLOBAL_LAYERS


def test_a_choice_wins_over_the_preset_and_the_preset_over_the_defaults():
    paper = settings_for("paper", {})
    assert (paper.init, paper.tv_weight, paper.global_layers) == ("random", 0.0, PAPER_GLOBAL_LAYERS)
    chosen = settings_for("paper", {"init": "content", "size": 300})
    assert (chosen.init, chosen.size, chosen.tv_weight) == ("content", 300, 0.0)
    assert settings_for("default", {"size": 300}) == Settings(size=300)


def test_a_terms_weight_is_the_users_else_the_presets():
    assert (term_weight("default", "global", None), term_weight("default", "local", None)) == (20.0, 2.5e-5)
    assert (term_weight("paper", "global", None), term_weight("paper", "local", None)) == (20.0, 1e-4)
    assert term_weight("paper", "local", 3e-5) == 3e-5
    with pytest.raises(FusionError, match="preset: 'gatys'"):
        term_weight("gatys", "local", None)
    style = smooth_image(16, 16, seed=1)
    # a form's weights at their defaults are the preset's, changed ones the user's; the rest of a term is kept
    terms = [GlobalStyle(style, scale=2.0), LocalStyle(style), LocalStyle(style, weight=7e-5, layer="relu2_1")]
    paper = preset_terms("paper", terms)
    assert [t.weight for t in paper] == [20.0, 1e-4, 7e-5]
    assert (paper[0].scale, paper[2].layer) == (2.0, "relu2_1") and paper[1].image is style
    assert [t.weight for t in preset_terms("default", terms)] == [20.0, 2.5e-5, 7e-5]


def test_a_forms_choices_are_the_values_that_differ_from_the_defaults():
    defaults = Settings()
    values = {"init": defaults.init, "tv_weight": 3.0, "size": defaults.size, "match_content": 0.0}
    assert chosen_fields(values) == {"tv_weight": 3.0, "match_content": 0.0}
    with pytest.raises(ValueError, match="not Settings fields"):
        chosen_fields({"colour": "none"})


def _direct_shares(terms) -> list[float]:
    """The shares of ``blend_shares`` computed position by position on the grid, one term at a time."""
    masks = []
    for term in terms:
        mask = torch.ones(BLEND_GRID, BLEND_GRID, dtype=torch.float64) if term.target_mask is None else None
        if mask is None:
            mask = torch.nn.functional.interpolate(
                term.target_mask.double()[None, None], size=(BLEND_GRID, BLEND_GRID), mode="area"
            )[0, 0]
        masks.append(mask)
    shares = []
    for t, term in enumerate(terms):
        own = sum(float(masks[t][y, x]) ** 2 for y in range(BLEND_GRID) for x in range(BLEND_GRID))
        covered = 0.0
        for u, other in enumerate(terms):
            if type(other) is type(term) and other.weight > 0:
                overlap = sum(
                    float(masks[t][y, x] * masks[u][y, x]) for y in range(BLEND_GRID) for x in range(BLEND_GRID)
                )
                covered += other.blend * overlap / own
        shares.append(term.blend / covered)
    return shares


def test_blend_shares_blend_overlapping_terms_and_keep_separate_regions_whole():
    style = smooth_image(16, 16, seed=1)
    left = torch.zeros(40, 48)
    left[:, :24] = 1
    soft = torch.linspace(0, 1, 48).expand(40, 48).clone()
    # two styles over the whole image, blends 0.7 and 0.3: shares 0.7 and 0.3 of each kind's weight
    blended = [GlobalStyle(style, blend=0.7), GlobalStyle(style, blend=0.3), LocalStyle(style, blend=2.0)]
    assert blend_shares(blended) == pytest.approx([0.7, 0.3, 1.0])  # a lone local term keeps its weight
    # two styles in complementary regions: each its whole weight, whatever the blends
    regions = [GlobalStyle(style, target_mask=left, blend=1.0), GlobalStyle(style, target_mask=1 - left, blend=0.5)]
    assert blend_shares(regions) == pytest.approx([1.0, 1.0])
    # partial and soft overlaps: as the direct computation
    mixed = [
        GlobalStyle(style, target_mask=left, blend=1.0),
        GlobalStyle(style, target_mask=soft, blend=0.5),
        GlobalStyle(style, blend=0.25),
        LocalStyle(style, target_mask=soft, blend=1.0),
        LocalStyle(style, blend=3.0),
    ]
    assert blend_shares(mixed) == pytest.approx(_direct_shares(mixed))


def test_a_lone_terms_share_is_exactly_one():
    style = smooth_image(16, 16, seed=1)
    assert blend_shares([GlobalStyle(style, blend=0.37), LocalStyle(style, blend=0.37)]) == [1.0, 1.0]
    # a term of weight 0 takes no share from the others
    assert blend_shares([GlobalStyle(style), GlobalStyle(style, weight=0.0)])[0] == 1.0


def test_missing_layers_names_what_asks_for_each():
    vgg16 = tiny_vgg("vgg16")
    style = smooth_image(16, 16, seed=1)
    terms = [GlobalStyle(style, layers=("relu1_1", "relu3_4")), LocalStyle(style, layer="relu4_4")]
    found = missing_layers(vgg16, terms, Settings(content_layer="relu5_4"))
    assert found == [
        ("content_layer", ("relu5_4",)),
        ("styles[0].layers", ("relu3_4",)),
        ("styles[1].layer", ("relu4_4",)),
    ]
    assert missing_layers(tiny_vgg("vgg19"), terms, Settings(content_layer="relu5_4")) == []


def test_progress_says_how_a_level_is_evaluated():
    whole = Progress(level=1, levels=3, iteration=1, iterations=5, step=1, steps=15, history=4)
    tiled = Progress(level=3, levels=3, iteration=1, iterations=5, step=11, steps=15, tiles=9, history=5, split="pool3")
    assert whole.plan() == "whole, L-BFGS history 4"
    assert tiled.plan() == "9 tiles (layers after pool3 whole), L-BFGS history 5"
