"""What the nodes share: their category, the VGG layer names, and the STYLE_LOSSES chain."""

from __future__ import annotations

from ..fusion_core.config import GLOBAL_LAYERS, StyleTerm
from ..fusion_core.errors import FusionError
from ..fusion_core.vgg import loss_layers

CATEGORY = "style_transfer/fusion"
STYLE_LOSSES = "STYLE_LOSSES"  # a list of fusion_core GlobalStyle / LocalStyle terms
# Words a user may type in the node search to find every node of the pack; each node adds its own. ComfyUI
# reads a node class's SEARCH_ALIASES into /object_info as "search_aliases" where it supports them; older
# versions ignore the attribute.
PACK_ALIASES = ["style transfer", "neural style", "fusion style", "Gatys", "CNNMRF", "MRF", "Gram", "VGG"]

# Layers a loss can use: VGG19's ReLU and pooling outputs (VGG16 has all of them but relu3_4, relu4_4, relu5_4).
LAYERS = loss_layers("vgg19")


def parse_layers(name: str, text: str) -> tuple[str, ...]:
    """``"relu1_2, relu2_2"`` as a tuple of layer names, each checked against ``LAYERS``."""
    layers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not layers:
        raise FusionError(f"{name}: give at least one layer, e.g. {','.join(GLOBAL_LAYERS)}")
    unknown = [layer for layer in layers if layer not in LAYERS]
    if unknown:
        raise FusionError(f"{name}: unknown layer(s) {', '.join(map(repr, unknown))}; valid: {', '.join(LAYERS)}")
    return layers


def chain(previous: list[StyleTerm] | None, terms: list[StyleTerm]) -> list[StyleTerm]:
    """A new list: the chained-in terms, then ``terms`` (the input list is never changed)."""
    return [*(previous or []), *terms]
