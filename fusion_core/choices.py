"""A user's choices turned into a run's Settings and terms: the one place the command line, the nodes and the library
share, so that they cannot disagree.

- ``settings_for``: a preset and the fields the user chose. A choice wins over the preset, the preset over the
  defaults. The command line's choices are the flags given; a form's (a node's widgets, which always hold a value)
  are the values that differ from their defaults (``chosen_fields``).
- ``term_weight`` / ``preset_terms``: a style term's weight (a1, a2) under a preset, the user's own where given.
- ``blend_shares``: each style term's share of its kind's weight, from the terms' blend weights and target masks.
- ``missing_layers``: the layers a run asks for that a network lacks, by what asks for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, replace

import torch
import torch.nn.functional as F

from .config import PRESET_WEIGHTS, GlobalStyle, Settings, StyleTerm, defaults, preset, preset_fields
from .vgg import VGGFeatures

BLEND_GRID = 64  # the side of the grid the target masks are compared on (``blend_shares``)


def settings_for(preset_name: str, chosen: Mapping[str, object]) -> Settings:
    """The Settings of preset ``preset_name`` ("default" or "paper") with the user's ``chosen`` fields on top."""
    return preset(preset_name, **dict(chosen))


def chosen_fields(values: Mapping[str, object]) -> dict[str, object]:
    """The Settings fields among ``values`` that differ from their defaults: what a form's widgets say the user
    chose (a widget left at its default leaves the field to the preset)."""
    known = {item.name for item in fields(Settings)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"not Settings fields: {sorted(unknown)}")
    default = vars(defaults(Settings))
    return {name: value for name, value in values.items() if value != default[name]}


def term_weight(preset_name: str, kind: str, chosen: float | None) -> float:
    """The weight of a style term of ``kind`` ("global": a1, "local": a2): the user's ``chosen`` one, else preset
    ``preset_name``'s."""
    preset_fields(preset_name)  # a clear error for an unknown preset
    if kind not in ("global", "local"):
        raise ValueError(f"kind: expected 'global' or 'local', got {kind!r}")
    return PRESET_WEIGHTS[preset_name][kind] if chosen is None else float(chosen)


def preset_terms(preset_name: str, terms: Sequence[StyleTerm]) -> list[StyleTerm]:
    """``terms`` with the weights a form left at their defaults set to preset ``preset_name``'s (the nodes: a
    widget always holds a value, so one at its default is taken as no choice, as in ``chosen_fields``)."""
    done = []
    for term in terms:
        kind = "global" if isinstance(term, GlobalStyle) else "local"
        chosen = None if term.weight == PRESET_WEIGHTS["default"][kind] else term.weight
        done.append(replace(term, weight=term_weight(preset_name, kind, chosen)))
    return done


def blend_shares(terms: Sequence[StyleTerm]) -> list[float]:
    """Each term's share of its weight: its blend weight over the blend weights of the terms of its kind (global or
    local) that cover the same part of the output.

    Terms that cover the same positions (no target masks, or the same ones) blend: their shares add up to 1, so two
    styles at blend 1 each paint half and half, not twice as strongly. Terms in separate regions (complementary
    target masks) do not compete: each keeps its whole weight there. In general the share of term t is
    blend_t / sum over u of blend_u * overlap(t, u), where overlap(t, u) = <m_t, m_u> / <m_t, m_t> is the part of
    t's region (its mask m, all ones without one) that u covers, measured on a BLEND_GRID grid. A lone term's
    share is 1, whatever its blend; a term of weight 0 takes no share from the others."""
    masks = [_grid_mask(term.target_mask) for term in terms]
    shares = []
    for t, term in enumerate(terms):
        own = float((masks[t] * masks[t]).sum())
        if own <= 0:  # an empty region: the term has no positions to share
            shares.append(1.0)
            continue
        total = 0.0
        for u, other in enumerate(terms):
            if isinstance(other, GlobalStyle) == isinstance(term, GlobalStyle) and other.weight > 0:
                total += other.blend * float((masks[t] * masks[u]).sum()) / own
        shares.append(term.blend / total if total > 0 else 1.0)
    return shares


def _grid_mask(mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(BLEND_GRID, BLEND_GRID, dtype=torch.float64)
    grid = F.interpolate(mask.detach().double().cpu()[None, None], size=(BLEND_GRID, BLEND_GRID), mode="area")
    return grid[0, 0]


def missing_layers(
    vgg: VGGFeatures, terms: Iterable[StyleTerm], settings: Settings
) -> list[tuple[str, tuple[str, ...]]]:
    """The layers the run asks for that ``vgg`` lacks (a VGG16 has no relu3_4, relu4_4, relu5_4), each with what
    asks for it: "content_layer", "global_layers" (the paper preset's Gram layers), "styles[i].layers" or
    "styles[i].layer"; empty when the network has them all."""
    asked = [("content_layer", (settings.content_layer,))]
    if settings.global_layers is not None:
        asked.append(("global_layers", tuple(settings.global_layers)))
    for i, term in enumerate(terms):
        if isinstance(term, GlobalStyle):
            if settings.global_layers is None:
                asked.append((f"styles[{i}].layers", tuple(term.layers)))
        else:
            asked.append((f"styles[{i}].layer", (term.layer,)))
    found = []
    for where, layers in asked:
        missing = tuple(layer for layer in layers if layer not in vgg.names)
        if missing:
            found.append((where, missing))
    return found
