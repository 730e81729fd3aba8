"""The optimisation: minimise a1 * global + a2 * local + a3 * content over the image, coarse to fine."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from .colour import COLOR_MODES, grey, luminance_only, match_histogram, recombine_chroma, rgb_to_yiq
from .config import GlobalStyle, LocalStyle, Progress, Settings, StyleTerm
from .errors import Cancelled, FusionError
from .functional import patch_weights
from .images import check_image, check_mask, resize, resize_mask
from .lbfgs import LBFGS
from .losses import ContentLoss, GramLoss, PatchLoss, TVLoss
from .matching import MATCHERS
from .memory import check_memory
from .precision import autocast, full_precision, into_half, mixed_dtype, out_of_half
from .pyramid import fit_longest, level_shapes
from .vgg import VGGFeatures

INITS = ("random", "content")
OPTIMIZERS = ("lbfgs", "adam")


class Criterion:
    """The weighted loss terms of one pyramid level, evaluated on an image."""

    def __init__(
        self,
        vgg: VGGFeatures,
        terms: list[tuple[str, float, torch.nn.Module]],
        tv_weight: float = 0.0,
        mixed_precision: bool = False,
    ):
        self.vgg, self.terms, self.tv_weight = vgg, terms, tv_weight
        # float16 on CUDA, bfloat16 on a CPU with bfloat16 instructions, else None; see precision.py
        self.half_dtype = mixed_dtype(vgg.device, mixed_precision)
        self.layers = {layer for _, _, module in terms for layer in _layers_of(module)}
        self.patch_losses = [m for _, _, m in terms if isinstance(m, PatchLoss)]
        self.due: dict[str, list[tuple[str, float, torch.nn.Module]]] = {}  # deepest layer -> terms
        for term in terms:
            self.due.setdefault(max(_layers_of(term[2]), key=vgg.names.index), []).append(term)

    def __call__(self, image: Tensor, *, rematch: bool) -> dict[str, Tensor]:
        """The weighted terms by kind, and their "total".

        Each term is evaluated as soon as the VGG pass has produced its layers. Autograd runs the most
        recently recorded operations first, so a term on a shallow layer then gets its gradient (as large
        as the layer) only when the backward pass reaches that layer, rather than holding it through the
        whole backward pass: ~0.4 GB less at the peak at 1024 px.
        """
        half, device = self.half_dtype is not None, self.vgg.device
        activations: dict[str, Tensor] = {}  # as the network gives them: 16-bit under autocast
        features: dict[str, Tensor] = {}  # as the losses see them: float32
        values: dict[str, Tensor] = {}

        def evaluate(name: str, activation: Tensor) -> None:
            activations[name] = activation
            features.update(out_of_half({name: activation}, half))
            for kind, weight, module in self.due.get(name, ()):
                if rematch and isinstance(module, PatchLoss):
                    module.match(activations)  # the patch search runs under autocast too
                with full_precision(device, half):
                    values[kind] = values.get(kind, 0.0) + weight * module(features)

        with autocast(device, self.half_dtype):  # the VGG pass and the patch search only
            if self.layers:
                self.vgg(into_half(image, half), self.layers, on_layer=evaluate)
        if self.tv_weight > 0:
            values["tv"] = self.tv_weight * TVLoss()(image)
        values["total"] = sum(values.values())
        return values


def _layers_of(module: torch.nn.Module) -> tuple[str, ...]:
    return tuple(getattr(module, "layers", None) or (module.layer,))


def stylize(
    vgg: VGGFeatures,
    content: Tensor,
    styles: Sequence[StyleTerm],
    settings: Settings | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Stylise ``content`` (1, 3, H, W, RGB 0..1) with the given style terms; returns the image in 0..1.

    Runs on ``vgg``'s device. ``on_progress`` receives a ``Progress`` after every iteration;
    ``should_stop`` is called before every iteration and, when it returns True, ``Cancelled`` is raised.
    Works inside ``torch.inference_mode()`` / ``no_grad`` (it re-enables autograd for itself).
    """
    settings = settings or Settings()
    with torch.inference_mode(False), torch.enable_grad():
        _make_autograd_ready(vgg)
        content = check_image("content", content).clone()
        styles = _checked_styles(styles)
        _check_settings(vgg, styles, settings)
        shapes = level_shapes(content.shape[-2], content.shape[-1], settings.size, settings.levels)
        _check_sizes(styles, settings, shapes)
        check_memory(vgg, shapes[-1], styles, settings)
        content = content.to(vgg.device)
        target, styles = _apply_colour_mode(content, styles, settings.color)
        image = None
        steps = settings.levels * settings.iterations
        for level, shape in enumerate(shapes):
            criterion = build_criterion(vgg, target, styles, settings, shape)
            image = initial_image(target, shape, settings) if image is None else resize(image, shape)
            image = _optimise_level(criterion, image, settings, level, steps, on_progress, should_stop)
        image = image.clamp(0, 1)
        if settings.color == "luminance":
            image = recombine_chroma(image, resize(content, tuple(image.shape[-2:])))
        return image


def _apply_colour_mode(content: Tensor, styles: list[StyleTerm], mode: str) -> tuple[Tensor, list[StyleTerm]]:
    """The content and style images the network sees under colour mode ``mode`` (see colour.py)."""
    if mode == "none":
        return content, styles
    converted: dict[int, Tensor] = {}  # one conversion per distinct style image
    for style in styles:
        if id(style.image) not in converted:
            image = style.image.to(content.device)
            fixed = luminance_only(image, content) if mode == "luminance" else match_histogram(image, content)
            converted[id(style.image)] = fixed
    styles = [replace(style, image=converted[id(style.image)]) for style in styles]
    return (grey(rgb_to_yiq(content)[:, :1]) if mode == "luminance" else content), styles


def initial_image(content: Tensor, shape: tuple[int, int], settings: Settings) -> Tensor:
    if settings.init == "content":
        return resize(content, shape)
    # Drawn on the CPU so a seed gives the same start on every device.
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.rand(1, 3, *shape, generator=generator).to(content.device)


def build_criterion(
    vgg: VGGFeatures, content: Tensor, styles: Sequence[StyleTerm], settings: Settings, shape: tuple[int, int]
) -> Criterion:
    """Targets for one level: content features, style Grams and style patch banks at this size."""
    with torch.no_grad():
        terms: list[tuple[str, float, torch.nn.Module]] = []
        feature_cache: dict[tuple[int, float], dict[str, Tensor]] = {}

        def style_features(style: StyleTerm, layers: Sequence[str]) -> dict[str, Tensor]:
            # Each style image is resized and run through the network once per level and scale.
            style_shape = fit_longest(style.image.shape[-2], style.image.shape[-1], round(max(shape) * style.scale))
            cached = feature_cache.setdefault((id(style.image), style.scale), {})
            missing = [layer for layer in layers if layer not in cached]
            if missing:
                cached.update(vgg(resize(style.image.to(content.device), style_shape), missing))
            return {layer: cached[layer] for layer in layers}

        active = [style for style in styles if style.weight > 0]
        for style in active:
            layers = style.layers if isinstance(style, GlobalStyle) else (style.layer,)
            features = style_features(style, layers)
            target_masks = _masks_at(style.target_mask, {l: _feature_shape(shape, l) for l in layers}, content.device)
            style_masks = _masks_at(
                style.style_mask, {l: tuple(f.shape[-2:]) for l, f in features.items()}, content.device
            )
            if isinstance(style, GlobalStyle):
                # One module per layer (the loss is their mean), each evaluated as soon as its layer exists.
                for layer in layers:
                    gram = GramLoss({layer: features[layer]}, {layer: style_masks[layer]}, {layer: target_masks[layer]})
                    terms.append(("global", style.weight / len(layers), gram))
                continue
            layer = style.layer
            eligible = weights = None
            if style_masks[layer] is not None:
                eligible = patch_weights(style_masks[layer], style.patch_size, style.stride) >= 0.5
                if not eligible.any():
                    raise FusionError("style_mask: the region is too small to hold one style patch at this size")
            if target_masks[layer] is not None:
                weights = patch_weights(target_masks[layer], style.patch_size, style.stride)
            module = PatchLoss(
                layer,
                features[layer],
                style.patch_size,
                style.stride,
                style_eligible=eligible,
                target_weights=weights,
                matcher=settings.matcher,
            )
            terms.append(("local", style.weight, module))
        if settings.content_weight > 0:
            layer = settings.content_layer
            target = vgg(resize(content, shape), [layer])[layer]
            energies = [float(style_features(style, [layer])[layer].square().mean()) for style in active]
            energy = sum(energies) / len(energies) if energies else float(target.square().mean())
            terms.append(("content", settings.content_weight, ContentLoss(layer, target, energy)))
        return Criterion(vgg, terms, settings.tv_weight, settings.mixed_precision)


def _optimise_level(
    criterion: Criterion,
    image: Tensor,
    settings: Settings,
    level: int,
    steps: int,
    on_progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> Tensor:
    image = image.detach().clone().requires_grad_(True)
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam([image], lr=settings.learning_rate or 0.02)
    else:
        # One L-BFGS iteration per step() call: exactly one loss evaluation each, so progress,
        # cancellation and re-matching happen between iterations. A level of n iterations stores at most
        # n - 1 curvature pairs, so a longer history would be memory never used.
        history = min(settings.history_size, max(1, settings.iterations - 1))
        optimizer = LBFGS(image, lr=settings.learning_rate or 1, history_size=history)
    last: dict[str, float] = {}

    rematch = True

    def closure() -> Tensor:
        image.grad = None
        values = criterion(image, rematch=rematch)
        values["total"].backward()
        last.clear()
        last.update({name: float(value.detach()) for name, value in values.items()})
        return values["total"]

    for iteration in range(1, settings.iterations + 1):
        if should_stop is not None and should_stop():
            raise Cancelled("stopped by the caller")
        rematch = (iteration - 1) % settings.rematch_every == 0
        optimizer.step(closure)
        if settings.optimizer == "adam":
            with torch.no_grad():
                image.clamp_(0, 1)  # Adam takes fixed-size steps that would otherwise leave 0..1
        if not math.isfinite(last["total"]):
            raise FusionError("the loss became NaN or infinite; lower the loss weights or use init='content'")
        if on_progress is not None:
            step = level * settings.iterations + iteration
            preview = settings.preview_every > 0 and (
                iteration % settings.preview_every == 0 or iteration == settings.iterations
            )
            on_progress(
                Progress(
                    level=level + 1,
                    levels=settings.levels,
                    iteration=iteration,
                    iterations=settings.iterations,
                    step=step,
                    steps=steps,
                    losses=dict(last),
                    image=image.detach().clamp(0, 1).clone() if preview else None,
                )
            )
    return image.detach()


def _make_autograd_ready(vgg: VGGFeatures) -> None:
    # A model built under torch.inference_mode() (as ComfyUI runs its loader nodes) holds inference
    # tensors, which autograd refuses to save for backward; replace them by ordinary copies.
    for module in vgg.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.is_inference():
                copy = tensor.clone()
                if isinstance(tensor, torch.nn.Parameter):
                    module._parameters[name] = torch.nn.Parameter(copy, requires_grad=False)
                else:
                    module._buffers[name] = copy


def _checked_styles(styles: Sequence[StyleTerm]) -> list[StyleTerm]:
    if isinstance(styles, (GlobalStyle, LocalStyle)):
        styles = [styles]
    checked = []
    images: dict[int, Tensor] = {}  # a style image shared by several terms stays one tensor
    for i, style in enumerate(styles):
        if not isinstance(style, (GlobalStyle, LocalStyle)):
            raise FusionError(f"styles[{i}]: expected GlobalStyle or LocalStyle, got {type(style).__name__}")
        if id(style.image) not in images:
            images[id(style.image)] = check_image(f"styles[{i}].image", style.image).clone()
        image = images[id(style.image)]
        target_mask = (
            None if style.target_mask is None else check_mask(f"styles[{i}].target_mask", style.target_mask).clone()
        )
        style_mask = (
            None if style.style_mask is None else check_mask(f"styles[{i}].style_mask", style.style_mask).clone()
        )
        checked.append(
            type(style)(**{**vars(style), "image": image, "target_mask": target_mask, "style_mask": style_mask})
        )
    return checked


def _check_settings(vgg: VGGFeatures, styles: Sequence[StyleTerm], settings: Settings) -> None:
    def positive_int(name: str, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise FusionError(f"{name}: expected a whole number >= 1, got {value!r}")

    def weight(name: str, value: float) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise FusionError(f"{name}: expected a finite number >= 0, got {value!r}")

    positive_int("size", settings.size)
    positive_int("levels", settings.levels)
    positive_int("iterations", settings.iterations)
    positive_int("history_size", settings.history_size)
    positive_int("rematch_every", settings.rematch_every)
    if settings.matcher not in MATCHERS:
        raise FusionError(f"matcher: {settings.matcher!r} is not one of {', '.join(MATCHERS)}")
    if settings.init not in INITS:
        raise FusionError(f"init: {settings.init!r} is not one of {', '.join(INITS)}")
    if settings.optimizer not in OPTIMIZERS:
        raise FusionError(f"optimizer: {settings.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if settings.color not in COLOR_MODES:
        raise FusionError(f"color: {settings.color!r} is not one of {', '.join(COLOR_MODES)}")
    if not isinstance(settings.mixed_precision, bool):  # a string such as "false" would read as on
        raise FusionError(f"mixed_precision: expected True or False, got {settings.mixed_precision!r}")
    if settings.learning_rate is not None and not (
        isinstance(settings.learning_rate, (int, float)) and 0 < settings.learning_rate < math.inf
    ):
        raise FusionError(f"learning_rate: expected a number > 0 or None, got {settings.learning_rate!r}")
    weight("content_weight", settings.content_weight)
    weight("tv_weight", settings.tv_weight)
    vgg.check_layers([settings.content_layer])
    for i, style in enumerate(styles):
        weight(f"styles[{i}].weight", style.weight)
        if not (isinstance(style.scale, (int, float)) and 0.05 <= style.scale <= 8):
            raise FusionError(f"styles[{i}].scale: expected a number from 0.05 to 8, got {style.scale!r}")
        if isinstance(style, GlobalStyle):
            if not style.layers:
                raise FusionError(f"styles[{i}].layers: give at least one layer")
            vgg.check_layers(style.layers)
        else:
            vgg.check_layers([style.layer])
            positive_int(f"styles[{i}].patch_size", style.patch_size)
            positive_int(f"styles[{i}].stride", style.stride)
    if settings.content_weight == 0 and settings.tv_weight == 0 and all(style.weight == 0 for style in styles):
        raise FusionError("weights: all loss weights are zero; give the content or a style term a weight > 0")


def _feature_shape(shape: tuple[int, int], layer: str) -> tuple[int, int]:
    """Spatial shape of ``layer``'s activation for an input of ``shape`` (pools floor-divide by 2)."""
    h, w = shape
    pools = int(layer[4:].split("_")[0]) - (0 if layer.startswith("pool") else 1)
    for _ in range(pools):
        h, w = h // 2, w // 2
    return h, w


def _masks_at(
    mask: Tensor | None, shapes: dict[str, tuple[int, int]], device: torch.device
) -> dict[str, Tensor | None]:
    if mask is None:
        return dict.fromkeys(shapes)
    return {layer: resize_mask(mask, shape).to(device) for layer, shape in shapes.items()}


def _check_sizes(styles: Sequence[StyleTerm], settings: Settings, shapes: list[tuple[int, int]]) -> None:
    """Every layer in use needs one position (one patch, for the local loss) at the coarsest level."""
    coarsest = shapes[0]

    def check(what: str, shape: tuple[int, int], layer: str, minimum: int, advice: str) -> None:
        if min(_feature_shape(shape, layer)) < minimum:
            raise FusionError(
                f"{what}: at the coarsest level it is {shape[0]}x{shape[1]} px, too small for {layer}"
                f"{' with ' + str(minimum) + 'x' + str(minimum) + ' patches' if minimum > 1 else ''}; {advice}"
            )

    advice = f"use a larger size (now {settings.size}) or fewer levels (now {settings.levels})"
    check("size", coarsest, settings.content_layer, 1, advice)
    for i, style in enumerate(styles):
        style_shape = fit_longest(style.image.shape[-2], style.image.shape[-1], round(max(coarsest) * style.scale))
        if isinstance(style, GlobalStyle):
            needs = [(layer, 1) for layer in style.layers]
        else:
            needs = [(style.layer, style.patch_size)]
        for layer, minimum in needs:
            check("size", coarsest, layer, minimum, advice)
            check(f"styles[{i}].image", style_shape, layer, minimum, advice + " or a larger style scale")
