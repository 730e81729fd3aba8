"""The loss and its image gradient evaluated tile by tile, exactly, for images too large to evaluate whole.

Every term of the loss is a sum over feature positions once a few whole-image quantities are known: the Gram
loss's Gram matrices and the patch loss's matches. So an evaluation makes two passes over the tiles:

1. without autograd: each tile adds its positions' part to the Gram matrices and matches its patches;
2. with autograd, tile by tile: each term restricted to the positions the tile owns (for a Gram term, the
   gradient of <dL/dG, the tile's part of G>, dL/dG taken at the whole image's G), backward into the tile's crop,
   and the crop's gradient added to the image's.

Each tile owns a block of the canvas; its crop reaches beyond the block by the receptive field of the deepest
layer in use (its halo) and starts on a multiple of that layer's stride, so the activations at the positions it
owns are the whole image's and the tiled gradient equals the untiled one up to float rounding. The second pass
holds one tile's activations at a time; only the image-sized vectors, the targets at the loss layers and the Gram
matrices stay whole. Style and content images are run through the network in tiles too (``tiled_maps``).

The price of exactness: dL/dG depends on every tile, so no tile's backward pass can start before every tile has
been through the network once. Run so, an evaluation runs the tiled layers forward twice, plus the halos
(BENCHMARKS.md has what that costs). A cheaper scheme (Gram matrices from the previous
evaluation, or naive tiles) would change the loss, the result and, with naive tiles, leave seams.

Much of that price is paid in the deep layers, which hold little memory: a sixteenth of the pixels or fewer, but
the largest receptive fields (the halos) and a third or more of the forward pass's time. So a tiled evaluation
may ``split`` after a pooling layer: the tiles run the layers up to it (halos of that layer's receptive field) and
also write its map of the whole image in the first pass; the layers after it run on that map whole, with autograd,
their terms exactly as the untiled criterion computes them; their backward pass gives that map's gradient, which
the second pass carries back through each tile with the shallow terms'. Only the shallow layers run twice, with
small halos. ``memory.plan_level`` picks the shallowest split that fits (the fastest), else none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .criterion import Criterion
from .errors import FusionError
from .functional import gram_part, gram_scale, memory_format_of, patch_grid, total_variation_of_band
from .geometry import feature_shape
from .losses import ContentLoss, GramLoss, PatchLoss
from .precision import GradientScale, autocast, float32_region, full_float32, memory_format
from .tiles import Tile, TilePlan, tile_layers
from .vgg import VGGFeatures


def tiled_maps(
    vgg: VGGFeatures,
    image: Tensor,
    tile: int,
    layers: Iterable[str] = (),
    grams: dict[str, Tensor | None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The activations of ``layers`` for ``image``, and the Gram matrices (``functional.gram_matrix``) of the
    layers in ``grams`` (each with its mask at the layer's size, or None), computed tile by tile: no activation of
    the whole image is held but those asked for."""
    layers, grams = list(layers), grams or {}
    shape = tuple(image.shape[-2:])
    plan = TilePlan(vgg.names, shape, dict.fromkeys([*layers, *grams], (0, 0)), tile)
    maps: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    scales = {
        layer: gram_scale(None if mask is None else mask.square(), math.prod(feature_shape(shape, layer)))
        for layer, mask in grams.items()
    }
    with torch.no_grad():
        for tile in plan.tiles:
            crop = image[..., tile.crop[0], tile.crop[1]]

            def collect(name: str, activation: Tensor, tile: Tile = tile) -> None:
                local, window = plan.local(tile, name)
                part = activation[..., local[0], local[1]]
                if name in layers:
                    if name not in maps:
                        size = (1, part.shape[1], *feature_shape(shape, name))
                        maps[name] = torch.empty(
                            size, dtype=part.dtype, device=part.device, memory_format=memory_format(part.device)
                        )
                    maps[name][..., window[0], window[1]] = part
                if name in grams:
                    mask = grams[name]
                    square = None if mask is None else mask.square()[window][None, None]
                    gram = gram_part(part.float(), square, scales[name])
                    sums[name] = gram if name not in sums else sums[name] + gram

            vgg(crop, [*layers, *grams], on_layer=collect)
    return maps, sums


@dataclass
class _Recorded:
    """The last tile of the first pass, recorded with autograd so the second pass need not run it again."""

    tile: Tile
    crop: Tensor
    activations: dict[str, Tensor]  # the shallow layers' activations (detached)
    seeds: _Seeds  # where its gradients are added, made during its forward pass


class _Seeds:
    """The gradients a tile's backward pass adds at the positions the tile owns, layer by layer.

    ``wrap`` passes an activation on through ``_AddGradients``, an identity whose backward pass adds the gradients
    given with ``add`` to the activation's gradient, in place, at the owned positions: computed when the backward
    pass reaches the activation, so no more is held at once than the gradient itself. Autograd would write each
    term's gradient (through a slice of the activation) into zeros of the activation's size, cast it, and add it
    to the gradient from the layers above: four passes over a tile-sized map per term, and their page faults."""

    def __init__(self, scale: GradientScale) -> None:
        self.scale = scale
        self.roots: list[Tensor] = []
        self.gradients: dict[str, list[tuple[Callable[[], Tensor | None], bool]]] = {}

    def wrap(self, name: str, activation: Tensor, local: tuple[slice, slice]) -> Tensor:
        """``activation`` (layer ``name``), to be used in its place in the pass: the gradients added for ``name``
        reach it at the positions ``local``."""
        gradients = self.gradients.setdefault(name, [])
        passed, root = _AddGradients.apply(activation, local, gradients, self.scale)
        self.roots.append(root)
        return passed

    def add(self, name: str, gradient: Callable[[], Tensor | None], of_loss: bool = True) -> None:
        """A gradient at layer ``name``'s owned positions, computed when the backward pass reaches it: a loss
        term's (float32; ``of_loss``: scaled on entering a 16-bit pass), or one from the same pass's scale."""
        self.gradients[name].append((gradient, of_loss))

    def backward(self) -> bool:
        """Runs the backward pass; False when there was nothing to differentiate."""
        if self.roots:
            torch.autograd.backward(self.roots)
        return bool(self.roots)


class _AddGradients(torch.autograd.Function):
    """Identity on ``activation``; its backward pass adds ``gradients`` (functions, each giving a gradient at the
    positions ``local`` or None, and whether it is a loss term's, ``_Seeds.add``) to the incoming gradient there,
    in place. The second output, a zero, is a
    root of the backward pass, so the gradients are added where nothing above the activation sends one."""

    @staticmethod
    def forward(
        ctx,
        activation: Tensor,
        local: tuple[slice, slice],
        gradients: list[tuple[Callable[[], Tensor | None], bool]],
        scale: GradientScale,
    ) -> tuple[Tensor, Tensor]:
        ctx.local, ctx.gradients, ctx.scale = local, gradients, scale
        ctx.shape, ctx.dtype, ctx.device = activation.shape, activation.dtype, activation.device
        ctx.layout = memory_format_of(activation)
        ctx.set_materialize_grads(False)
        # a view with the activation's strides, the batch's included: the layers above take their layout from it
        return activation[:], activation.new_zeros(())

    @staticmethod
    def backward(ctx, grad: Tensor | None, _: Tensor | None) -> tuple[Tensor, None, None, None]:
        if grad is None:  # nothing above this layer in the tile's pass
            grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=ctx.layout).zero_()
        window = grad[..., ctx.local[0], ctx.local[1]]
        with float32_region(grad.device):
            for gradient, of_loss in ctx.gradients:
                part = gradient()
                if part is None:
                    continue
                if of_loss and ctx.scale.enabled:  # into the 16-bit pass: scaled and measured (GradientScale)
                    ctx.scale.observe(part)  # the largest unscaled gradient entering the pass
                    part = part * ctx.scale.scale
                window.add_(part.to(grad.dtype))  # cast first: an add that casts as it goes is many times slower
        return grad, None, None, None


def _float32_window(activation: Tensor, local: tuple[slice, slice]) -> Tensor:
    """The positions ``local`` of ``activation``, detached, in float32 (as the losses see them: the 16-bit pass's
    activations are cast) and in the activation's layout."""
    window = activation.detach()[..., local[0], local[1]]
    if window.dtype == torch.float32:
        return window
    return window.to(torch.float32, memory_format=memory_format_of(activation))


def _gram_gradient(
    module: GramLoss,
    weight: float,
    layer: str,
    activation: Tensor,
    local: tuple[slice, slice],
    window: tuple[slice, slice],
    shape: tuple[int, int],
    slopes: dict[int, dict[str, Tensor]],
) -> Tensor:
    """A Gram term's weighted gradient at the positions ``local`` of ``activation`` (``window`` of ``layer``'s map
    of ``shape``), from its slope in ``slopes`` (filled at the end of the first pass). The gradient is linear in
    the slope: the weight scales the C x C slope rather than the map-sized gradient."""
    owned = _float32_window(activation, local)
    return module.part_grad(layer, owned, window, shape, weight * slopes[id(module)][layer])


def _split_gradient(deep: list[Tensor], window: tuple[slice, slice]) -> Tensor | None:
    """The deep layers' gradient at ``window`` of the split layer's map (``deep[0]``), once their pass has run."""
    grad = deep[0].grad if deep else None
    return None if grad is None else grad[..., window[0], window[1]]


def _given(gradient: Tensor) -> Tensor:
    return gradient


def _splittable(criterion: Criterion, split: str) -> bool:
    depth = criterion.vgg.names.index(split)
    return all(
        len({criterion.vgg.names.index(layer) <= depth for layer in module.layers}) == 1
        for _, _, module in criterion.terms
    )


class TiledCriterion:
    """A ``Criterion`` evaluated tile by tile (the module docstring says how); ``evaluate`` as the criterion's.

    With a ``split`` (a pooling layer), only the layers up to it run in tiles: the first pass also stores the
    ``split`` layer's map of the whole image, the layers after it run on that map whole, with autograd, their terms
    exactly as the untiled criterion computes them, and their backward pass gives the gradient of that map, which
    the second pass carries back through each tile. The deep layers have a sixteenth of the pixels or fewer and
    the largest receptive fields: running them whole removes most of the halos and most of the second forward
    pass, for the memory of the deep layers' pass on the whole map.

    The first pass records its last tile with autograd and the second pass starts with it: one tile's forward pass
    fewer per evaluation, at no extra memory beyond the deep layers' pass (that tile's record is the second pass's
    first tile)."""

    def __init__(self, criterion: Criterion, canvas: tuple[int, int], tile: int, split: str | None = None) -> None:
        self.criterion, self.canvas, self.split = criterion, canvas, split
        # never a reason to trim the heaps between evaluations: a tiled level's caller may return freed blocks as they
        # are freed (stylize's ``tiled_level``)
        self.full_search = False
        self.vgg, self.gradient_scale = criterion.vgg, criterion.gradient_scale
        names = self.vgg.names
        depth = len(names) if split is None else names.index(split)
        deepest = max(names.index(layer) for layer in criterion.layers)
        if split is not None and not (split.startswith("pool") and depth < deepest and _splittable(criterion, split)):
            raise FusionError(
                f"split: {split!r} must be a pooling layer before the deepest layer in use, with no Gram term's layers "
                "on both sides of it"
            )
        self.head = criterion.layers if split is None else criterion.layers - criterion.layers_after(split)
        in_head = [module for _, _, module in criterion.terms if self.head.issuperset(module.layers)]
        patches = [(m.layer, m.patch_size, m.stride) for m in in_head if isinstance(m, PatchLoss)]
        self.plan = TilePlan(names, canvas, tile_layers(names, criterion.layers, patches, split), tile)
        self.grams = [module for module in in_head if isinstance(module, GramLoss)]
        self.gram_weights = {id(module): weight for _, weight, module in criterion.terms if module in self.grams}
        self.patches = [module for module in in_head if isinstance(module, PatchLoss)]

    @property
    def tiles(self) -> int:
        return len(self.plan.tiles)

    def evaluate(self, image: Tensor, *, rematch: bool) -> dict[str, Tensor]:
        """The weighted terms by kind and their "total" (detached), with ``image.grad`` set to the total's gradient."""
        with full_float32(self.criterion.half_dtype is None):  # as the untiled evaluation (precision.py)
            return self._evaluate(image, rematch=rematch)

    def _evaluate(self, image: Tensor, *, rematch: bool) -> dict[str, Tensor]:
        criterion, scale = self.criterion, self.gradient_scale
        rematch = rematch or any(module.indices is None for module in self.patches)
        image.grad = None  # the last evaluation's: an image-sized vector
        known, slopes, recorded, deep = self._first_pass(image.detach(), rematch)
        deep_values, largest = {}, None
        if deep is not None:  # the layers after the split, whole, as the untiled criterion evaluates them
            deep.requires_grad_(True)
            deep_values = criterion.evaluate_after(deep, self.split, rematch=rematch)
            deep_values.pop("total").backward()
            largest = self.gradient_scale.largest
        values: dict[str, Tensor] = {}
        for name in self.vgg.names:  # the untiled criterion's order of terms
            for kind, weight, module in criterion.terms_at(name):
                value = weight * known[id(module)] if id(module) in known else image.new_zeros(())
                values[kind] = values.get(kind, 0.0) + value
        for kind, value in deep_values.items():
            values[kind] = values[kind] + value.detach()
        grad = torch.zeros_like(image)
        layers = [*self.head] if self.split is None else [*self.head, self.split]
        tiles = self.plan.tiles if recorded is None else [recorded.tile, *self.plan.tiles[:-1]]
        split_map = [] if deep is None else [deep]
        for tile in tiles:
            if recorded is not None and tile is recorded.tile:
                crop, seeds = recorded.crop, recorded.seeds
                for name, activation in recorded.activations.items():
                    self._pulls(tile, name, activation, values, seeds)
                recorded = None
            else:
                crop = image.detach()[..., tile.crop[0], tile.crop[1]].requires_grad_(True)
                seeds = _Seeds(scale)

                def evaluate(name: str, activation: Tensor, tile=tile, seeds=seeds) -> Tensor:
                    passed = self._seed(tile, name, activation, slopes, split_map, seeds)
                    if name in self.head:
                        self._pulls(tile, name, activation, values, seeds)
                    return passed

                with autocast(self.vgg.device, criterion.half_dtype):
                    self.vgg(scale.unscale_at(crop), layers, on_layer=evaluate)
            if seeds.backward():
                grad[..., tile.crop[0], tile.crop[1]] += crop.grad
            del seeds
            if scale.largest is not None:
                largest = scale.largest if largest is None else torch.maximum(largest, scale.largest)
        scale.largest = largest
        if criterion.tv_weight > 0:
            values["tv"] = criterion.tv_weight * _total_variation_in_bands(image.detach(), grad, criterion.tv_weight)
        image.grad = grad
        values["total"] = sum(values.values())
        return values

    def _seed(
        self,
        tile: Tile,
        name: str,
        activation: Tensor,
        slopes: dict[int, dict[str, Tensor]],
        deep: list[Tensor],
        seeds: _Seeds,
    ) -> Tensor | None:
        """``activation`` (layer ``name`` of ``tile``'s crop) passed on with the gradients its backward pass adds at
        the positions the tile owns: the Gram terms' (those of <dL/dG, the tile's part of G>, computed directly:
        their values came from the first pass) and, at the split layer, the deep layers'. None for a layer with
        neither; the content and patch terms' are added by ``_pulls``."""
        if name not in self.head and name != self.split:
            return None
        local, window = self.plan.local(tile, name)
        passed = seeds.wrap(name, activation, local)
        if name == self.split:
            seeds.add(name, partial(_split_gradient, deep, window), of_loss=False)  # scaled in the deep pass
        shape = feature_shape(self.canvas, name)
        for module in self.grams:
            if name in module.layers:
                weight = self.gram_weights[id(module)]
                args = (module, weight, name, activation.detach(), local, window, shape, slopes)
                seeds.add(name, partial(_gram_gradient, *args))
        return passed

    def _pulls(self, tile: Tile, name: str, activation: Tensor, values: dict[str, Tensor], seeds: _Seeds) -> None:
        """The content and patch terms due at layer ``name`` restricted to ``tile``'s positions: their shares
        added to ``values``, their gradients (differentiated at once, on the owned positions alone) to what the
        tile's backward pass adds there."""
        terms = [term for term in self.criterion.terms_at(name) if not isinstance(term.module, GramLoss)]  # _seed
        if not terms:
            return
        local, window = self.plan.local(tile, name)
        window_float32 = _float32_window(activation, local)  # one copy for the layer's terms
        for kind, weight, module in terms:
            with torch.enable_grad(), float32_region(self.vgg.device):
                owned = window_float32.detach().requires_grad_(True)
                if isinstance(module, ContentLoss):
                    pull = weight * module.part(owned, window)
                else:
                    pull = weight * module.part(owned, window, feature_shape(self.canvas, name))
                (gradient,) = torch.autograd.grad(pull, owned)
            values[kind] = values[kind] + pull.detach()
            seeds.add(name, partial(_given, gradient))

    def _gram_part(self, module: GramLoss, layer: str, features: Tensor, tile: Tile) -> Tensor:
        return module.part(layer, features, self.plan.local(tile, layer)[1], feature_shape(self.canvas, layer))

    def _collect(
        self,
        tile: Tile,
        name: str,
        activation: Tensor,
        layers: set[str],
        matches: list[TiledMatch],
        sums: dict[tuple[int, str], Tensor],
        deep: list[Tensor],
    ) -> None:
        """The first pass's work at layer ``name`` of ``tile``'s crop: its part of the Gram matrices (into
        ``sums``), its part of the ``matches`` being made and, at the split layer, its part of that map (``deep``)."""
        plan, device = self.plan, self.vgg.device
        if name not in layers:
            return
        if name == self.split:
            local, window = plan.local(tile, name)
            if not deep:
                size = (1, activation.shape[1], *feature_shape(self.canvas, name))
                deep.append(activation.new_empty(size).contiguous(memory_format=memory_format(device)))
            deep[0][..., window[0], window[1]] = activation[..., local[0], local[1]].detach()
        grams = [module for module in self.grams if name in module.layers]
        if grams:
            with torch.no_grad(), float32_region(device):
                owned = _float32_window(activation, plan.local(tile, name)[0])  # one copy for the layer's terms
                for module in grams:
                    part = self._gram_part(module, name, owned, tile)
                    key = (id(module), name)
                    sums[key] = part if key not in sums else sums[key] + part
        for match in matches:
            if match.loss.layer == name:
                match.part(activation.detach(), plan.origin(tile, name), plan.owned(tile, name))

    def _first_pass(
        self, image: Tensor, rematch: bool
    ) -> tuple[dict[int, Tensor], dict[int, dict[str, Tensor]], _Recorded | None, Tensor | None]:
        """The whole image's Gram matrices, tile by tile, (``rematch``) the patches' matches and (with a split) the
        ``split`` layer's map of the whole image. Returns each Gram loss's value and its gradient with respect to
        each of its Gram matrices, the recorded last tile and (with a split) the map."""
        criterion, plan, scale, split = self.criterion, self.plan, self.gradient_scale, self.split
        device = self.vgg.device
        layers = {layer for module in self.grams for layer in module.layers}
        matches = (
            [TiledMatch(module, feature_shape(self.canvas, module.layer)) for module in self.patches] if rematch else []
        )
        layers |= {match.loss.layer for match in matches}
        if split is not None:
            layers.add(split)
        sums: dict[tuple[int, str], Tensor] = {}
        deep: list[Tensor] = []
        slopes: dict[int, dict[str, Tensor]] = {}  # filled at the end
        recorded = None
        if layers:
            for i, tile in enumerate(plan.tiles):
                record = i == len(plan.tiles) - 1
                crop = image[..., tile.crop[0], tile.crop[1]]
                activations: dict[str, Tensor] = {}
                seeds = _Seeds(scale)

                def collect(
                    name: str, activation: Tensor, tile=tile, activations=activations, record=record, seeds=seeds
                ) -> Tensor | None:
                    passed = None
                    if record:  # its gradients are computed in the second pass, from the slopes known by then
                        passed = self._seed(tile, name, activation, slopes, deep, seeds)
                        if name in self.head:
                            activations[name] = activation.detach()
                    self._collect(tile, name, activation, layers, matches, sums, deep)
                    return passed

                with torch.set_grad_enabled(record), autocast(device, criterion.half_dtype):
                    if record:
                        crop = crop.requires_grad_(True)
                        self.vgg(scale.unscale_at(crop), self.head | layers, on_layer=collect)
                        recorded = _Recorded(tile, crop, activations, seeds)
                    else:
                        self.vgg(crop, sorted(layers), on_layer=collect)
        for match in matches:
            match.finish()
        values = {}
        with torch.enable_grad(), float32_region(device):
            for module in self.grams:
                grams = {layer: sums[(id(module), layer)].detach().requires_grad_(True) for layer in module.layers}
                value = module.loss_of(grams)
                found = torch.autograd.grad(value, list(grams.values()))
                values[id(module)] = value.detach()
                slopes[id(module)] = dict(zip(grams, found, strict=True))
        return values, slopes, recorded, deep[0] if deep else None


class TiledMatch:
    """A patch loss's matches of the whole map, found in parts, tile by tile, in the first pass: ``part`` for each
    tile's window, then ``finish`` gives them to the loss (``PatchLoss.set_matches``). A full search or a propagation,
    as the loss's matcher decides for the whole map at the start (``Matcher.full_due``): a propagation looks at the
    ring of patches around a part (their previous matches) and re-ranks the candidates the last full search kept."""

    def __init__(self, loss: PatchLoss, shape: tuple[int, int]) -> None:
        self.loss, self.search = loss, loss.searcher()
        rows, cols = patch_grid(*shape, loss.patch_size, loss.stride)
        previous = loss.indices if loss.indices is not None and loss.indices.numel() == rows * cols else None
        self.full = self.search.full_due(previous)
        kept = self.search.pool
        self.pool = None if kept is None or self.full or previous is None else kept.view(rows, cols, -1)
        self.previous = None if previous is None else previous.view(rows, cols)
        self.new = torch.empty(rows, cols, dtype=torch.long, device=loss.style.device)
        self.pools: list[tuple[range, range, Tensor]] = []  # this full search's candidates, part by part

    @torch.no_grad()
    def part(self, features: Tensor, origin: tuple[int, int], owned: tuple[range, range]) -> None:
        """Match the patches whose first position is in ``owned`` (rows, cols) from ``features``, a window of the
        map whose first position is ``origin``, holding those patches and the ring of patches around them."""
        loss, search, new, previous = self.loss, self.search, self.new, self.previous
        step, size = loss.stride, loss.patch_size
        rows, cols = (
            range(-(-r.start // step), min(n, -(-r.stop // step))) for r, n in zip(owned, new.shape, strict=True)
        )
        if not (len(rows) and len(cols)):
            return
        ring = 0 if self.full or previous is None else 1  # propagation looks at the neighbours' previous matches
        r0, r1 = max(0, rows.start - ring), min(new.shape[0], rows.stop + ring)
        c0, c1 = max(0, cols.start - ring), min(new.shape[1], cols.stop + ring)
        y, x = r0 * step - origin[0], c0 * step - origin[1]
        query = features[..., y : y + (r1 - r0 - 1) * step + size, x : x + (c1 - c0 - 1) * step + size]
        query = loss.query(query, (r0 * step, c0 * step))
        before = None if previous is None else previous[r0:r1, c0:c1].reshape(-1)
        if ring:
            found = search.propagate(query, before, self.pool[r0:r1, c0:c1].reshape(before.shape[0], -1))
        else:
            found = search.full_search(query, before)
            if search.pool is not None:  # candidates to keep for the propagations that follow
                self.pools.append((rows, cols, search.pool))
        inner = found.view(r1 - r0, c1 - c0)[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
        new[rows.start : rows.stop, cols.start : cols.stop] = inner

    @torch.no_grad()
    def finish(self) -> None:
        new = self.new
        if self.pools:  # the candidates of this full search, for the propagations that follow
            whole = new.new_empty(*new.shape, self.pools[0][2].shape[1])
            for rows, cols, part in self.pools:
                whole[rows.start : rows.stop, cols.start : cols.stop] = part.view(len(rows), len(cols), -1)
            self.search.keep_candidates(whole.view(new.numel(), -1))
        self.loss.set_matches(new.view(-1))


TV_BAND = 256  # rows of the image per band of the total-variation term


def _total_variation_in_bands(image: Tensor, grad: Tensor, weight: float) -> Tensor:
    """``functional.total_variation_loss(image)``, its gradient times ``weight`` added to ``grad``, in bands of
    rows: its autograd of the whole image would hold several image-sized temporaries."""
    height = image.shape[-2]
    total = image.new_zeros(())
    for top in range(0, height, TV_BAND):
        bottom = min(height, top + TV_BAND)
        band = image[..., top : min(height, bottom + 1), :].detach().requires_grad_(True)  # and the next row
        value = total_variation_of_band(band, image.shape, rows=bottom - top)
        (weight * value).backward()
        grad[..., top : band.shape[-2] + top, :] += band.grad
        total = total + value.detach()
    return total
