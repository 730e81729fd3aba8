"""Loss modules for one pyramid level: targets are computed once and held as buffers.

Each module takes the dict of VGG activations of the current image and returns an unweighted
scalar; the optimiser applies the weights a1, a2, a3.

Normalisation. Every term is a relative error, so it does not change with the image size (the
pyramid levels stay in balance) nor with the scale of the network's activations (Caffe-convention
features are ~50x larger than torchvision ones); README "Loss normalisation" has the measurements.
- global: ||G - G_style||^2 / ||G_style||^2 per layer, averaged over the layers;
- content: CONTENT_SCALE x the mean squared distance to the content features, in units of the style
  images' mean squared activation on the same layer (the unit the local term uses too);
- local: the mean over output patches of ||p - s_match||^2 / (mean ||s||^2 over style patches),
  times LOCAL_SCALE. CNNMRF sums raw patch distances on 0..255 Caffe activations, which is why the
  paper's a2 (1e-4) is ~1e5 below a1; LOCAL_SCALE keeps a2 on the paper's scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as Fn
from .matching import MATCHERS
from .precision import accumulation_dtype

# Chosen with benchmarks/quality.py (docs/RESULTS.md): at a1 = 20, a2 = 1e-4, a3 = 20 the output moves about as
# far from the photo as the classic tools' outputs do while taking the style's strokes; the local term pulls as
# hard as it can without pasting the style's motifs into the photo.
# Both are ratios of relative errors, so they hold for any network's activation scale.
LOCAL_SCALE = 1e5
CONTENT_SCALE = 0.2


class GramLoss(nn.Module):
    """Gram loss against fixed style Grams, optionally guided by a mask per layer."""

    def __init__(
        self,
        style_features: dict[str, Tensor],
        style_masks: dict[str, Tensor | None] | None = None,
        target_masks: dict[str, Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        self.layers = tuple(style_features)
        style_masks = style_masks or {}
        self.target_masks = target_masks or {}
        for layer, features in style_features.items():
            self.register_buffer(f"gram_{layer}", Fn.gram_matrix(features, style_masks.get(layer)).detach())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for layer in self.layers:
            total = total + Fn.gram_loss(features[layer], getattr(self, f"gram_{layer}"), self.target_masks.get(layer))
        return total / len(self.layers)


class ContentLoss(nn.Module):
    """Feature distance to the content image; ``energy`` is the unit (see the module docstring)."""

    def __init__(self, layer: str, target: Tensor, energy: float) -> None:
        super().__init__()
        self.layer, self.layers, self.energy = layer, (layer,), energy
        self.register_buffer("target", target.detach())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return CONTENT_SCALE * Fn.content_loss(features[self.layer], self.target, self.energy)


class PatchLoss(nn.Module):
    """MRF loss on one layer. ``match`` (no autograd) picks the nearest style patches; ``forward``
    pulls every output patch toward its match. The optimiser decides when to call ``match``.

    ``matcher`` names the search in ``matching.MATCHERS``; it is built for the style map at the first
    ``match`` and kept, so per-style work (the fast search's projection) is done once per level."""

    def __init__(
        self,
        layer: str,
        style_features: Tensor,
        patch_size: int = 3,
        stride: int = 1,
        *,
        style_eligible: Tensor | None = None,
        target_weights: Tensor | None = None,
        matcher: str = "exact",
    ) -> None:
        super().__init__()
        self.layer, self.layers = layer, (layer,)
        self.patch_size, self.stride, self.matcher = patch_size, stride, matcher
        self.register_buffer("style", style_features.detach())
        self.style_eligible = style_eligible
        self.target_weights = target_weights
        # squared norm of every style patch, in float64 where the device has it cheaply (precision.py)
        wide = accumulation_dtype(self.style.device)
        self.style_energy = Fn.patch_norms(self.style.to(wide), patch_size, stride).square()
        energy = self.style_energy if style_eligible is None else self.style_energy[style_eligible]
        self.patch_energy = float(energy.mean())
        self.indices: Tensor | None = None  # last match, for inspection
        self._targets: tuple[Tensor, Tensor, Tensor] | None = None
        self._search = None

    @torch.no_grad()
    def match(self, features: dict[str, Tensor]) -> None:
        current = features[self.layer].detach()
        if self._search is None:
            self._search = MATCHERS[self.matcher](self.style, self.patch_size, self.stride, self.style_eligible)
        self.indices = self._search(current, self.indices)  # the fast search keeps the last match a candidate
        self._targets = Fn.mrf_targets(
            self.style,
            self.indices,
            tuple(current.shape[-2:]),
            self.patch_size,
            self.stride,
            self.target_weights,
            self.style_energy,
        )

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        if self._targets is None:
            self.match(features)
        coverage = self._targets[0]
        patch_weight = coverage.sum() / self.patch_size**2  # sum of the per-patch weights
        normaliser = patch_weight.clamp_min(1e-8) * max(self.patch_energy, 1e-8)
        return LOCAL_SCALE * Fn.mrf_loss(features[self.layer], *self._targets) / normaliser


class TVLoss(nn.Module):
    def forward(self, image: Tensor) -> Tensor:
        return Fn.total_variation_loss(image)
