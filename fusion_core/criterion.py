"""The loss of one pyramid level: a1 * global + a2 * local + a3 * content (+ TV), evaluated on an image.

``Criterion`` holds the level's weighted terms (``Term``s; targets.py builds them) and evaluates them on an image,
running the VGG pass in 16 bits where the device has them (precision.py). Its public contract, which the tiled
evaluation (tiling.py) builds on: ``terms``, ``terms_at(layer)``, ``layers``, ``layers_after(layer)``,
``evaluate_after(split_map, split)``, ``half_dtype``, ``gradient_scale``, ``tv_weight``, ``vgg``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .losses import PatchLoss, TVLoss
from .precision import GradientScale, autocast, float32_region, full_float32, mixed_dtype
from .vgg import VGGFeatures


class Term(NamedTuple):
    """One weighted term of a level's loss."""

    kind: str  # "global", "local" or "content": the name its value is reported under
    weight: float  # a1, a2 or a3 (a blend's share of it)
    module: torch.nn.Module  # the loss module (losses.py): its ``layers``, called on the activations


class Criterion:
    """The weighted loss terms of one pyramid level, evaluated on an image."""

    def __init__(self, vgg: VGGFeatures, terms: list[Term], tv_weight: float = 0.0, mixed_precision: bool = False):
        self.vgg, self.terms, self.tv_weight = vgg, terms, tv_weight
        # float16 on CUDA, bfloat16 on a CPU with bfloat16 instructions, else None; see precision.py
        self.half_dtype = mixed_dtype(vgg.device, mixed_precision)
        # float16's range needs the scale; bfloat16 has float32's (precision.GradientScale)
        self.gradient_scale = GradientScale(enabled=self.half_dtype == torch.float16)
        self.layers = {layer for term in terms for layer in term.module.layers}
        self.full_search = False  # whether the last evaluation ran a full patch search (PatchLoss.match)
        self._due: dict[str, list[Term]] = {}  # deepest layer of a term -> the terms evaluated there
        for term in terms:
            self._due.setdefault(max(term.module.layers, key=vgg.names.index), []).append(term)

    def terms_at(self, layer: str) -> list[Term]:
        """The terms evaluated as soon as the pass reaches ``layer``: those whose deepest layer it is."""
        return self._due.get(layer, [])

    def evaluate_after(self, split_map: Tensor, split: str, *, rematch: bool) -> dict[str, Tensor]:
        """The terms on the layers after ``split``, ``split_map`` being that layer's map (a tiled evaluation's deep
        layers, tiling.py): as ``__call__``, without the total variation."""
        return self(split_map, rematch=rematch, after=split)

    def __call__(self, image: Tensor, *, rematch: bool, after: str | None = None) -> dict[str, Tensor]:
        """The weighted terms by kind, and their "total"; ``rematch``: search the nearest style patches again.
        ``after``: ``image`` is that layer's map, and only the terms on the layers after it are evaluated
        (``evaluate_after``).

        Each term is evaluated as soon as the VGG pass has produced its layers. Autograd runs the most
        recently recorded operations first, so a term on a shallow layer then gets its gradient (as large
        as the layer) only when the backward pass reaches that layer, rather than holding it through the
        whole backward pass: ~0.4 GB less at the peak at 1024 px.
        """
        device, scale = self.vgg.device, self.gradient_scale
        activations: dict[str, Tensor] = {}  # as the network gives them: 16-bit under autocast
        features: dict[str, Tensor] = {}  # as the losses see them: float32
        values: dict[str, Tensor] = {}
        self.full_search = False

        def evaluate(name: str, activation: Tensor) -> None:
            activations[name] = activation
            features[name] = scale.for_losses(activation)
            for kind, weight, module in self.terms_at(name):
                if rematch and isinstance(module, PatchLoss):
                    self.full_search |= module.match(activations)  # the patch search runs under autocast too
                with float32_region(device):
                    values[kind] = values.get(kind, 0.0) + weight * module(features)

        layers = self.layers if after is None else self.layers_after(after)
        # the VGG pass and the patch search only in 16 bits; the rest in float32 on every device (precision.py)
        with full_float32(self.half_dtype is None), autocast(device, self.half_dtype):
            if after is not None:
                scale.largest = None  # the pass does not start at the image: its gradient stays scaled
                self.vgg(image, layers, on_layer=evaluate, after=after)
            elif layers:
                self.vgg(scale.unscale_at(image), layers, on_layer=evaluate)
        if self.tv_weight > 0 and after is None:
            values["tv"] = self.tv_weight * TVLoss()(image)
        values["total"] = sum(values.values())
        return values

    def layers_after(self, layer: str) -> set[str]:
        """The layers in use after ``layer``."""
        depth = self.vgg.names.index(layer)
        return {name for name in self.layers if self.vgg.names.index(name) > depth}

    def evaluate(self, image: Tensor, *, rematch: bool) -> dict[str, Tensor]:
        """The weighted terms by kind and their "total" (detached), with ``image.grad`` set to the total's gradient
        (``tiling.TiledCriterion.evaluate`` does the same tile by tile)."""
        image.grad = None
        values = self(image, rematch=rematch)
        with full_float32(self.half_dtype is None):
            values["total"].backward()
        return {name: value.detach() for name, value in values.items()}
