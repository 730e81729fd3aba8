"""The optimisation: minimise a1 * global + a2 * local + a3 * content over the image, coarse to fine."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .colour import COLOR_MODES, grey, luminance_only, match_histogram, recolour, recombine_chroma, rgb_to_yiq
from .config import INITS, LOCAL_MIN_STYLE_SIDE, GlobalStyle, LocalStyle, Progress, Settings, StyleTerm
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

OPTIMIZERS = ("lbfgs", "adam")
BORDER_FRACTION = 1 / 64  # of a level's longest side: the mirrored margin it is optimised with (border_margin)


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
        if settings.global_layers is not None:
            styles = [replace(t, layers=settings.global_layers) if isinstance(t, GlobalStyle) else t for t in styles]
        shapes = level_shapes(content.shape[-2], content.shape[-1], settings.size, settings.levels)
        _check_sizes(styles, settings, shapes)
        margin = border_margin(shapes[-1])
        check_memory(vgg, (shapes[-1][0] + 2 * margin, shapes[-1][1] + 2 * margin), styles, settings)
        content = content.to(vgg.device)
        target, styles = _apply_colour_mode(content, styles, settings.color)
        start = starting_image(target, styles, settings.init)
        image = None
        steps = settings.levels * settings.iterations
        for level, shape in enumerate(shapes):
            last = level == len(shapes) - 1
            margin = border_margin(shape)
            level_styles = styles_at_level(styles, settings, shape, last)
            criterion = build_criterion(vgg, target, level_styles, settings, shape, margin=margin)
            if image is None:
                image = random_image(shape, settings.seed, vgg.device) if start is None else resize(start, shape)
            else:
                image = carry_up(image, shape, None if start is None else resize(start, shape))
            canvas = _optimise_level(
                criterion, mirror_pad(image, margin), settings, level, steps, on_progress, should_stop, margin
            )
            image = _inner(canvas, margin)
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


def starting_image(content: Tensor, styles: Sequence[StyleTerm], init: str) -> Tensor | None:
    """The image the optimisation starts from, at the content's size; None for a random start.

    "recolored": the content in the styles' colours (``colour.recolour``; each style weighs by its weight relative
    to its kind's default, within its target mask). Starting from the photo keeps its structure and leaves no
    noise for the network to overlook (a noise start ends in speckle of colours in neither image); recolouring
    it first means the optimiser need not invent the style's palette from the photo's, which the Gram loss
    alone does with high-frequency patterns of the wrong colours rather than by repainting large areas.
    """
    if init == "random":
        return None
    if init == "content":
        return content
    sources: dict[tuple[int, int, int], list] = {}  # per style image and masks: (image, weight, masks)
    for style in styles:
        if style.weight <= 0:
            continue
        key = (id(style.image), id(style.target_mask), id(style.style_mask))
        default = type(style).__dataclass_fields__["weight"].default
        source = sources.setdefault(key, [style.image, 0.0, style.target_mask, style.style_mask])
        source[1] += style.weight / default
    shape = tuple(content.shape[-2:])
    return recolour(
        content,
        [
            (
                image.to(content.device),
                weight,
                None if target_mask is None else resize_mask(target_mask, shape),
                None if style_mask is None else resize_mask(style_mask, tuple(image.shape[-2:])),
            )
            for image, weight, target_mask, style_mask in sources.values()
        ],
    )


def random_image(shape: tuple[int, int], seed: int, device: torch.device) -> Tensor:
    # Drawn on the CPU so a seed gives the same start on every device.
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *shape, generator=generator).to(device)


def carry_up(image: Tensor, shape: tuple[int, int], start: Tensor | None = None) -> Tensor:
    """The previous level's result enlarged to ``shape``, the next level's start.

    With a ``start`` image (the content, at ``shape``), the detail that the smaller level could not hold is
    added back from it: the enlarged result alone is blurred, and the finer level would only partly sharpen it,
    leaving the content's edges soft.
    """
    enlarged = resize(image, shape)
    if start is None:
        return enlarged
    return enlarged + start - resize(resize(start, tuple(image.shape[-2:])), shape)


def border_margin(shape: tuple[int, int]) -> int:
    """Pixels of mirrored margin around a level's image while it is optimised (BORDER_FRACTION of its longest side,
    at least 4), cropped off afterwards.

    The outermost pixels of an image are seen by fewer of the network's windows than any other, so they are the
    least held by the losses, and the optimiser paints them with stripes of colours in neither image. With a
    margin, every pixel of the picture is an inner one; the margin itself, optimised with the rest, is dropped.
    """
    return max(4, round(max(shape) * BORDER_FRACTION))


def mirror_pad(image: Tensor, margin: int) -> Tensor:
    """``image`` with a ``margin`` px border mirrored from its edges (repeated where the image is narrower)."""
    if margin == 0:
        return image
    mode = "reflect" if min(image.shape[-2:]) > margin else "replicate"
    return F.pad(image, (margin,) * 4, mode=mode)


def styles_at_level(
    styles: Sequence[StyleTerm], settings: Settings, shape: tuple[int, int], last: bool
) -> list[StyleTerm]:
    """The style terms used at a level of output ``shape``.

    Unless ``settings.local_all_levels``, the local terms start at the first level whose style image is
    LOCAL_MIN_STYLE_SIDE px on its longest side (always at the last level): below that a patch of the local
    loss (32 px for 3x3 patches on relu3_1) is a whole motif of the style, a face or a hat, which the
    nearest-patch pull would paste into the photo's sky or water. The coarse levels, which lay out colour and
    large forms, are left to the global and content terms.
    """
    if settings.local_all_levels or last:
        return list(styles)
    return [
        style
        for style in styles
        if not isinstance(style, LocalStyle) or round(max(shape) * style.scale) >= LOCAL_MIN_STYLE_SIDE
    ]


def build_criterion(
    vgg: VGGFeatures,
    content: Tensor,
    styles: Sequence[StyleTerm],
    settings: Settings,
    shape: tuple[int, int],
    *,
    margin: int = 0,
) -> Criterion:
    """Targets for one level: content features, style Grams and style patch banks at this size.

    With a ``margin``, the criterion scores the image of ``shape`` with that mirrored border around it (see
    ``border_margin``): the content and the target masks get the same border.
    """
    canvas = (shape[0] + 2 * margin, shape[1] + 2 * margin)

    def on_canvas(mask: Tensor | None) -> Tensor | None:
        if mask is None or margin == 0:
            return mask
        return F.pad(resize_mask(mask, shape)[None, None], (margin,) * 4, mode="replicate")[0, 0]

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
            target_masks = _masks_at(
                on_canvas(style.target_mask), {l: _feature_shape(canvas, l) for l in layers}, content.device
            )
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
            target = vgg(mirror_pad(resize(content, shape), margin), [layer])[layer]
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
    margin: int = 0,
) -> Tensor:
    """Optimise ``image`` (with its ``margin``, which previews leave out) against ``criterion``."""
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
                    image=_inner(image, margin).detach().clamp(0, 1).clone() if preview else None,
                )
            )
    return image.detach()


def _inner(image: Tensor, margin: int) -> Tensor:
    return image[..., margin : image.shape[-2] - margin, margin : image.shape[-1] - margin]


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
    for name in ("mixed_precision", "local_all_levels"):  # a string such as "false" would read as on
        if not isinstance(getattr(settings, name), bool):
            raise FusionError(f"{name}: expected True or False, got {getattr(settings, name)!r}")
    if settings.learning_rate is not None and not (
        isinstance(settings.learning_rate, (int, float)) and 0 < settings.learning_rate < math.inf
    ):
        raise FusionError(f"learning_rate: expected a number > 0 or None, got {settings.learning_rate!r}")
    weight("content_weight", settings.content_weight)
    weight("tv_weight", settings.tv_weight)
    vgg.check_layers([settings.content_layer])
    if settings.global_layers is not None:
        if not settings.global_layers or isinstance(settings.global_layers, str):
            raise FusionError(f"global_layers: give a tuple of at least one layer, got {settings.global_layers!r}")
        vgg.check_layers(settings.global_layers)
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
