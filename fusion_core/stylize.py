"""The optimisation: minimise a1 * global + a2 * local + a3 * content over the image, coarse to fine.

``stylize`` checks its inputs, picks the start (the content recoloured to the style's palette by default),
and runs the pyramid: each level builds its criterion (criterion.py), optimises the image on a mirrored canvas
and hands the result, enlarged, to the next. Progress and cancellation go through callbacks only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor

from .allocator import trim_heaps
from .choices import blend_shares, missing_layers
from .colour import grey, luminance_only, match_histogram, recolour, recombine_chroma, rgb_to_yiq
from .config import GlobalStyle, LocalStyle, Progress, Settings, StyleTerm
from .criterion import Criterion
from .errors import Cancelled, FusionError
from .geometry import border_margin, feature_shape, level_shapes, style_shape, with_margin
from .images import check_image, check_mask, mirror_pad, resize, resize_mask
from .lbfgs import LBFGS
from .memory import LevelPlan, plan_level
from .precision import full_float32, mixed_dtype
from .targets import build_criterion, styles_at_level
from .tiling import TiledCriterion
from .vgg import VGGFeatures, loss_layers

# Called before each level is optimised with (0-based level, its criterion, the canvas it starts from).
LevelHook = Callable[[int, Criterion, Tensor], None]


class PixelTerm(Protocol):
    """A loss on the output's pixels added to a level's (``temporal.TemporalTerm``)."""

    def add_to(self, image: Tensor, grad: Tensor) -> Tensor:
        """Adds the term's gradient at ``image`` to ``grad``; returns its weighted value."""
        ...


class _WithPixelTerm:
    """A level's evaluation with a ``PixelTerm`` on the output's pixels (the canvas less its mirrored margin),
    reported as "temporal" and added to the total."""

    def __init__(self, evaluator: Criterion | TiledCriterion, term: PixelTerm, margin: int) -> None:
        self.evaluator, self.term, self.margin = evaluator, term, margin
        self.gradient_scale = evaluator.gradient_scale

    @property
    def full_search(self) -> bool:
        return self.evaluator.full_search

    def evaluate(self, image: Tensor, *, rematch: bool) -> dict[str, Tensor]:
        values = dict(self.evaluator.evaluate(image, rematch=rematch))
        m, (h, w) = self.margin, image.shape[-2:]
        inner = (..., slice(m, h - m), slice(m, w - m))
        with torch.no_grad():
            value = self.term.add_to(image.detach()[inner], image.grad[inner])
        values["total"] = values["total"] + value
        values["temporal"] = value
        return values


def stylize(
    vgg: VGGFeatures,
    content: Tensor,
    styles: Sequence[StyleTerm],
    settings: Settings | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_level: LevelHook | None = None,
    tiled_level: Callable[[torch.device], AbstractContextManager] | None = None,
    init_image: Tensor | None = None,
    pixel_term: PixelTerm | None = None,
) -> Tensor:
    """Stylise ``content`` (1, 3, H, W, RGB 0..1) with the given style terms; returns the image in 0..1.

    Runs on ``vgg``'s device. ``on_progress`` receives a ``Progress`` after every iteration;
    ``should_stop`` is called before every iteration and, when it returns True, ``Cancelled`` is raised;
    ``on_level`` (for measurements) sees each level's criterion and starting canvas; ``tiled_level(device)``, a
    context, is entered around each level evaluated in tiles (a program that owns its process passes
    ``allocator.freed_memory_returned``, which changes a process-wide allocator setting: none by default).
    Works inside ``torch.inference_mode()`` / ``no_grad`` (it re-enables autograd for itself). Leaves the process
    as it found it: the TF32 switches it sets on CUDA are set back (precision.full_float32).

    ``init_image`` (1, 3, h, w, any size) replaces the start ``settings.init`` gives (a video frame's: the previous
    stylised frame warped into it); ``pixel_term`` adds a loss on the output's pixels at every level (a
    ``temporal.TemporalTerm``).
    """
    settings = settings or Settings()
    # what stays float32 is computed in float32 on CUDA too, whatever the host set (precision.py)
    float32_path = mixed_dtype(vgg.device, settings.mixed_precision) is None
    with torch.inference_mode(False), torch.enable_grad(), full_float32(float32_path):
        vgg.make_autograd_ready()
        content, styles = _checked_inputs(vgg, content, styles, settings)
        shapes = level_shapes(content.shape[-2], content.shape[-1], settings.size, settings.levels)
        _check_sizes(styles, settings, shapes)
        _plan(vgg, with_margin(shapes[-1], border_margin(shapes[-1])), styles, settings)  # refused before any work
        content = content.to(vgg.device)
        target, styles = _apply_colour_mode(content, styles, settings.color)
        if init_image is None:
            start = starting_image(target, styles, settings.init)
        else:
            start = check_image("init_image", init_image).to(vgg.device)
        image = None
        for level, shape in enumerate(shapes):
            margin = border_margin(shape)
            level_styles = styles_at_level(styles, settings, shape, last=level == len(shapes) - 1)
            plan = _plan(vgg, with_margin(shape, margin), level_styles, settings)
            region = tiled_level if plan.tile > 0 and tiled_level is not None else None
            with contextlib.nullcontext() if region is None else region(vgg.device):
                criterion = build_criterion(vgg, target, level_styles, settings, shape, margin=margin, tile=plan.tile)
                evaluator: Criterion | TiledCriterion = criterion
                if plan.tile:
                    tiled = TiledCriterion(criterion, with_margin(shape, margin), plan.tile, plan.split)
                    evaluator = tiled if tiled.tiles > 1 else criterion  # one tile is the whole canvas
                if image is None:
                    image = random_image(shape, settings.seed, vgg.device) if start is None else resize(start, shape)
                else:
                    image = carry_up(image, shape, None if start is None else resize(start, shape))
                canvas, image = mirror_pad(image, margin), None  # at print sizes every image-sized copy counts
                if level == len(shapes) - 1:
                    start = None  # the last level has been started
                if on_level is not None:
                    on_level(level, criterion, canvas)
                tiles = evaluator.tiles if isinstance(evaluator, TiledCriterion) else 1
                # A level of n iterations stores at most n - 1 curvature pairs: a longer history would be memory
                # never used.
                iterations = settings.level_iterations(level)
                history = min(plan.history, max(1, iterations - 1))
                split = plan.split if tiles > 1 else None
                report = _reporter(on_progress, settings, level, margin, tiles, history, split)
                if pixel_term is not None:
                    evaluator = _WithPixelTerm(evaluator, pixel_term, margin)
                optimised = _optimise(evaluator, canvas, settings, iterations, history, report, should_stop)
                image = _inner(optimised, margin)
        image = image.clamp(0, 1)
        if settings.color == "luminance":
            image = recombine_chroma(image, resize(content, tuple(image.shape[-2:])))
        return image


def _plan(vgg: VGGFeatures, shape: tuple[int, int], styles: Sequence[StyleTerm], settings: Settings) -> LevelPlan:
    """``memory.plan_level`` for a canvas of ``shape``, after the C allocator has given the system what the process
    freed (on a CPU that memory is the run's to use, but the system counts it as the process's until then)."""
    if vgg.device.type == "cpu":
        trim_heaps()
    return plan_level(vgg, shape, styles, settings)


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


class _Adam:
    """torch's Adam with LBFGS's interface (``scalars``, ``step``), keeping the image in 0..1: Adam takes
    fixed-size steps that would otherwise leave it."""

    def __init__(self, image: Tensor, lr: float) -> None:
        self.image, self.adam = image, torch.optim.Adam([image], lr=lr)

    def scalars(self) -> Tensor:
        return self.image.new_zeros(0)

    def step(self, numbers: Sequence[float]) -> None:
        self.adam.step()
        with torch.no_grad():
            self.image.clamp_(0, 1)


def _optimise(
    criterion: Criterion | TiledCriterion,
    canvas: Tensor,
    settings: Settings,
    iterations: int,
    history: int,
    report: Callable[[int, dict[str, float], Tensor], None],
    should_stop: Callable[[], bool] | None,
) -> Tensor:
    """Optimise ``canvas`` against ``criterion`` for ``iterations`` iterations, L-BFGS keeping ``history``
    curvature pairs (``memory.plan_level``).

    Each iteration reads from the device once: the loss terms, whether the image gradient is finite, the
    gradient scale's measure and the optimiser's scalars travel as one tensor. A non-finite gradient in the
    16-bit pass is an overflow: the evaluation is repeated with a smaller scale (precision.GradientScale).
    """
    image = canvas.detach().requires_grad_(True)  # optimised in place: the caller's canvas is not used again
    if settings.optimizer == "adam":
        optimizer: LBFGS | _Adam = _Adam(image, settings.learning_rate or 0.02)
    else:
        optimizer = LBFGS(image, lr=settings.learning_rate or 1, history_size=history)
    trim = image.device.type == "cpu"
    for iteration in range(1, iterations + 1):
        if should_stop is not None and should_stop():
            raise Cancelled("stopped by the caller")
        rematch = (iteration - 1) % settings.rematch_every == 0
        losses, numbers = _evaluate(criterion, image, optimizer, rematch)
        if trim and criterion.full_search:
            # A full search frees large blocks that glibc keeps in its heaps, and the allocations after it only
            # fragmented them: an untiled 2048 px level in float32 peaked at 9-13 GB against an estimate of 6.8 GB,
            # 6.9 GB with the heaps trimmed after each full search (BENCHMARKS.md).
            trim_heaps()
        optimizer.step(numbers)
        report(iteration, losses, image)
    return image.detach()


def _evaluate(
    criterion: Criterion | TiledCriterion, image: Tensor, optimizer: LBFGS | _Adam, rematch: bool
) -> tuple[dict[str, float], list[float]]:
    """Evaluate the loss and set ``image.grad``; returns the terms and the optimiser's scalars, read from the
    device in one transfer. Repeats the evaluation while the gradient scale asks for it (an overflow in the
    16-bit pass) and raises where the loss or the image gradient is not finite."""
    scale = criterion.gradient_scale
    while True:
        values = criterion.evaluate(image, rematch=rematch)
        terms = torch.stack(list(values.values()))
        largest = image.new_zeros(()) if scale.largest is None else scale.largest
        checks = torch.stack([torch.isfinite(image.grad).all().float(), largest])
        numbers = torch.cat([terms, checks, optimizer.scalars()]).tolist()  # the one transfer
        losses = dict(zip(values, numbers, strict=False))
        finite, largest = numbers[len(values)] == 1, numbers[len(values) + 1]
        if not scale.update(largest, finite):
            break
        rematch = False  # the matches do not depend on the gradient's scale
    if not (finite and math.isfinite(losses["total"])):
        raise FusionError(
            "the loss or its gradient became NaN or infinite; lower the loss weights, use init='content' "
            "or switch mixed_precision off"
        )
    return losses, numbers[len(values) + 2 :]


def _reporter(
    on_progress: Callable[[Progress], None] | None,
    settings: Settings,
    level: int,
    margin: int,
    tiles: int,
    history: int,
    split: str | None,
) -> Callable[[int, dict[str, float], Tensor], None]:
    """The per-iteration report of ``level``: a ``Progress``, with the image (margin cut off) when a preview is
    due."""

    def report(iteration: int, losses: dict[str, float], image: Tensor) -> None:
        if on_progress is None:
            return
        every, last = settings.preview_every, settings.level_iterations(level)
        done = sum(settings.level_iterations(earlier) for earlier in range(level))
        preview = every > 0 and (iteration % every == 0 or iteration == last)
        on_progress(
            Progress(
                level=level + 1,
                levels=settings.levels,
                iteration=iteration,
                iterations=last,
                step=done + iteration,
                steps=settings.total_steps(),
                losses=losses,
                image=_inner(image, margin).detach().clamp(0, 1).clone() if preview else None,
                tiles=tiles,
                history=history if settings.optimizer == "lbfgs" else 0,
                split=split,
            )
        )

    return report


def _inner(image: Tensor, margin: int) -> Tensor:
    return image[..., margin : image.shape[-2] - margin, margin : image.shape[-1] - margin]


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


def _checked_inputs(
    vgg: VGGFeatures, content: Tensor, styles: Sequence[StyleTerm], settings: Settings
) -> tuple[Tensor, list[StyleTerm]]:
    """Every input checked (a FusionError names the first bad one), copied (the caller's tensors are never
    changed), with ``settings.global_layers`` applied."""
    settings.validate()
    content = check_image("content", content).clone()
    if isinstance(styles, (GlobalStyle, LocalStyle)):
        styles = [styles]
    checked = []
    images: dict[int, Tensor] = {}  # a style image shared by several terms stays one tensor
    for i, style in enumerate(styles):
        if not isinstance(style, (GlobalStyle, LocalStyle)):
            raise FusionError(f"styles[{i}]: expected GlobalStyle or LocalStyle, got {type(style).__name__}")
        style.validate(f"styles[{i}]")
        if id(style.image) not in images:
            images[id(style.image)] = check_image(f"styles[{i}].image", style.image).clone()
        changes: dict[str, object] = {"image": images[id(style.image)]}
        for name in ("target_mask", "style_mask"):
            if getattr(style, name) is not None:
                changes[name] = check_mask(f"styles[{i}].{name}", getattr(style, name)).clone()
        if isinstance(style, GlobalStyle) and settings.global_layers is not None:
            changes["layers"] = tuple(settings.global_layers)
        checked.append(replace(style, **changes))
    missing = missing_layers(vgg, checked, settings)
    if missing:
        asked = "; ".join(f"{where} asks for {', '.join(map(repr, layers))}" for where, layers in missing)
        raise FusionError(
            f"layers: unknown layer(s) for {vgg.arch}: {asked}; valid: {', '.join(loss_layers(vgg.arch))}"
        )
    # each term's weight times its share among the blended terms of its kind (choices.blend_shares); 1 for a lone one
    shares = blend_shares(checked)
    checked = [replace(style, weight=style.weight * share) for style, share in zip(checked, shares, strict=True)]
    if settings.content_weight == 0 and settings.tv_weight == 0 and all(style.weight == 0 for style in checked):
        raise FusionError("weights: all loss weights are zero; give the content or a style term a weight > 0")
    return content, checked


def _check_sizes(styles: Sequence[StyleTerm], settings: Settings, shapes: list[tuple[int, int]]) -> None:
    """Every layer in use needs one position (one patch, for the local loss) at the coarsest level."""
    coarsest = shapes[0]

    def check(what: str, shape: tuple[int, int], layer: str, minimum: int, advice: str) -> None:
        if min(feature_shape(shape, layer)) < minimum:
            raise FusionError(
                f"{what}: at the coarsest level it is {shape[0]}x{shape[1]} px, too small for {layer}"
                f"{' with ' + str(minimum) + 'x' + str(minimum) + ' patches' if minimum > 1 else ''}; {advice}"
            )

    advice = f"use a larger size (now {settings.size}) or fewer levels (now {settings.levels})"
    check("size", coarsest, settings.content_layer, 1, advice)
    for i, style in enumerate(styles):
        shape = style_shape(tuple(style.image.shape[-2:]), coarsest, style.scale)
        minimum = 1 if isinstance(style, GlobalStyle) else style.patch_size
        for layer in style.feature_layers():
            check("size", coarsest, layer, minimum, advice)
            check(f"styles[{i}].image", shape, layer, minimum, advice + " or a larger style scale")
