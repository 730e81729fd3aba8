"""Command line: ``python -m fusion_core --content C --style S --out O`` (also ``fusion-style``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch

from .allocator import freed_memory_returned
from .choices import settings_for, term_weight
from .config import (
    COLOR_MODES,
    INITS,
    MATCH_METRICS,
    MATCHER_NAMES,
    OPTIMIZERS,
    PRESET_WEIGHTS,
    PRESETS,
    GlobalStyle,
    LocalStyle,
    Progress,
    Settings,
    defaults,
)
from .errors import Cancelled, FusionError
from .flow import FLOW_NAMES, flow_estimator
from .images import check_output_path, load_image, save_image
from .media import ClipWriter, Frames, check_clip_output, is_clip, read_clip
from .precision import best_device
from .stylize import stylize
from .video import LATER_ITERATIONS, TEMPORAL_WEIGHT, VideoSettings, stylize_frames
from .weights import load_vgg

_DEFAULTS = defaults(Settings)
_GLOBAL, _LOCAL = defaults(GlobalStyle), defaults(LocalStyle)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusion-style",
        description="Neural style transfer fusing a global (Gram) and a local (MRF patch) style loss.",
    )
    p.add_argument(
        "--content", required=True, help="content image file; or a clip: a video file, or a folder of frames (by name)"
    )
    p.add_argument("--style", required=True, action="append", help="style image file (repeat for several styles)")
    p.add_argument(
        "--out",
        required=True,
        help="output image file (.png, .jpg, ...); for a clip a video file (.mp4, .mkv, .mov, .webm) or a folder",
    )
    p.add_argument(
        "--weights",
        default="vgg19",
        help="VGG weights: a .safetensors/.pth file, or 'vgg19' (found in --models-dir or downloaded)",
    )
    p.add_argument(
        "--models-dir",
        action="append",
        default=[],
        help="folder to look for / download named weights into (repeatable; default ~/.cache/fusion-style)",
    )
    p.add_argument(
        "--convention",
        default="auto",
        choices=["auto", "torchvision", "caffe"],
        help="input convention of the weights (auto: the file's metadata, else torchvision)",
    )
    p.add_argument("--pooling", default="max", choices=["max", "avg"])
    p.add_argument("--size", type=int, help=f"longest side of the output in pixels (default {_DEFAULTS.size})")
    p.add_argument("--levels", type=int, help=f"coarse-to-fine pyramid levels (default {_DEFAULTS.levels})")
    p.add_argument("--iters", type=int, help=f"iterations per level before the last (default {_DEFAULTS.iterations})")
    p.add_argument(
        "--final-iters",
        type=int,
        help=f"iterations at the last, largest level (default {_DEFAULTS.final_iterations}; 0: --iters); the last "
        "level costs 4x the one before it",
    )
    p.add_argument("--seed", type=int, help=f"seed of the random start (default {_DEFAULTS.seed})")
    p.add_argument("--global-weight", type=float, help=f"a1: Gram (global) style weight (default {_GLOBAL.weight:g})")
    p.add_argument(
        "--local-weight",
        type=float,
        help=f"a2: MRF patch (local) style weight (default {_LOCAL.weight:g}; {PRESET_WEIGHTS['paper']['local']:g} "
        "with --preset paper)",
    )
    p.add_argument(
        "--content-weight",
        type=float,
        help=f"a3: content weight (default {_DEFAULTS.content_weight:g}; {PRESETS['paper']['content_weight']:g} with "
        "--preset paper)",
    )
    p.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        help="paper: the paper's own set-up (random start, no total variation, local term on every level, a2 1e-4, "
        "a3 20, its Gram layers, the content at relu3_1, no content in the patch search); "
        "flags given explicitly still apply",
    )
    p.add_argument(
        "--init",
        choices=list(INITS),
        help="start from the content in the style's colours (recolored, default), the content as it is, or noise",
    )
    p.add_argument("--blend", type=float, nargs="+", help="one blend weight per --style (default: equal)")
    p.add_argument(
        "--mask",
        action="append",
        default=[],
        help="per --style: image file whose white region gets that style (give none or one per style)",
    )
    p.add_argument(
        "--style-scale",
        type=float,
        default=_GLOBAL.scale,
        help="style image size relative to the output (>1: larger brush strokes)",
    )
    p.add_argument(
        "--color",
        choices=list(COLOR_MODES),
        help="keep the content's colours: luminance-only transfer or style histogram matching",
    )
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), help=f"default {_DEFAULTS.optimizer}")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1 for L-BFGS, 0.02 for Adam)")
    p.add_argument(
        "--tv-weight",
        type=float,
        help=f"total-variation weight (default {_DEFAULTS.tv_weight:g}; 0 with --preset paper)",
    )
    p.add_argument("--save-every", type=int, default=0, help="also write the current image to --out every N iterations")
    p.add_argument(
        "--matcher",
        choices=list(MATCHER_NAMES),
        help="nearest-patch search of the local loss: fast (default) or exact (every style patch, every time)",
    )
    p.add_argument(
        "--rematch-every",
        type=int,
        help=f"search nearest patches every N iterations (default {_DEFAULTS.rematch_every})",
    )
    p.add_argument(
        "--content-layer",
        help=f"the VGG layer the content is compared at (default {_DEFAULTS.content_layer}, Gatys et al.'s: keeps the "
        f"photo's forms and leaves its textures to the style; {PRESETS['paper']['content_layer']}, the paper's, with "
        "--preset paper: holds finer detail and paints less)",
    )
    p.add_argument(
        "--match-content",
        type=float,
        help="the content's share, 0 to 1, in what the local loss's nearest style patches are searched for "
        f"(default {_DEFAULTS.match_content:g}; 0, the output alone, with --preset paper): keeps the painting's "
        "motifs (eyes, faces) out of the photo's sky and water",
    )
    p.add_argument(
        "--match-metric",
        choices=list(MATCH_METRICS),
        help=f"what 'nearest' means in the local loss's patch search (default {_DEFAULTS.match_metric}: feature "
        "distance, so faint texture is matched to faint strokes; correlation, the paper's normalised "
        "cross-correlation, with --preset paper: can pull faint texture to the painting's eyes)",
    )
    p.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        help="16-bit VGG pass and patch search where the hardware has it (float16 on CUDA, bfloat16 on CPUs with "
        "AVX512-BF16 or AMX); losses and image stay float32. --no-mixed-precision: float32 throughout",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        metavar="GB",
        help="the most memory the process may hold on its device, in GB: levels are evaluated in tiles, with a "
        "shorter L-BFGS history, to fit (default 0: what the device has free)",
    )
    p.add_argument(
        "--tile",
        type=int,
        metavar="PX",
        help="evaluate each level in tiles of at most PX px, the deep layers whole where they fit (the same result, "
        "in less memory; docs/large_prints.md). "
        "0 (default): tiles only where a level would not fit in the memory available",
    )
    video = p.add_argument_group("clips (--content a video file or a folder of frames)")
    video.add_argument(
        "--temporal-weight",
        type=float,
        default=TEMPORAL_WEIGHT,
        help=f"weight of the temporal term holding each frame to the previous one warped into it (default "
        f"{TEMPORAL_WEIGHT:g}; 0: the warped start only)",
    )
    video.add_argument(
        "--independent-frames", action="store_true", help="every frame on its own, as a still (the baseline)"
    )
    video.add_argument(
        "--later-iters",
        type=int,
        default=LATER_ITERATIONS,
        help=f"iterations of each frame after the first, at the output size only (default {LATER_ITERATIONS})",
    )
    video.add_argument(
        "--flow", default="auto", choices=["auto", *FLOW_NAMES], help="optical flow: OpenCV's DIS or RAFT"
    )
    video.add_argument("--raft-weights", help="torchvision raft_large weights (.safetensors or .pth) for --flow raft")
    p.add_argument("--device", default="auto", help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return best_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FusionError(f"device: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FusionError("device: cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FusionError("device: mps was asked for but no Apple GPU is available; use --device cpu")
    return device


def _progress_printer(quiet: bool):
    start = time.monotonic()

    def report(p: Progress) -> None:
        if quiet or not (p.iteration == 1 or p.iteration % 10 == 0 or p.iteration == p.iterations):
            return
        terms = "  ".join(f"{name} {value:.4g}" for name, value in p.losses.items())
        plan = f"  {p.plan()}" if p.tiles > 1 and p.iteration == 1 else ""
        print(
            f"level {p.level}/{p.levels}  iter {p.iteration:>4}/{p.iterations}  [{p.step}/{p.steps}]  "
            f"{terms}  {time.monotonic() - start:.0f}s{plan}",
            file=sys.stderr,
            flush=True,
        )

    return report


def _download_printer(quiet: bool):
    def report(done: int, total: int | None) -> None:
        if not quiet:
            of = f" of {total / 1e6:.0f} MB" if total else " MB"
            print(f"\rdownloading VGG19 weights: {done / 1e6:.0f}{of}", end="", file=sys.stderr, flush=True)

    return report


def style_terms(args: argparse.Namespace) -> list[GlobalStyle | LocalStyle]:
    """A global and a local term per --style, weighted by its blend weight and limited to its --mask."""
    n = len(args.style)
    blend = args.blend or [1.0] * n  # shared out by the library (choices.blend_shares)
    if len(blend) != n or any(b < 0 for b in blend) or sum(blend) <= 0:
        raise FusionError(f"blend: give {n} weight(s) >= 0, one per --style, not all zero; got {args.blend}")
    if args.mask and len(args.mask) != n:
        raise FusionError(f"mask: give one --mask per --style ({n}), or none; got {len(args.mask)}")
    terms: list[GlobalStyle | LocalStyle] = []
    for i, path in enumerate(args.style):
        style = load_image(path, f"style {path}")
        mask = load_image(args.mask[i], f"mask {args.mask[i]}").mean(1)[0] if args.mask else None
        common = dict(target_mask=mask, scale=args.style_scale, blend=blend[i])
        terms.append(GlobalStyle(style, weight=term_weight(args.preset, "global", args.global_weight), **common))
        terms.append(LocalStyle(style, weight=term_weight(args.preset, "local", args.local_weight), **common))
    return terms


def _saver(path: str, every: int, report: Callable[[Progress], None]) -> Callable[[Progress], None]:
    def on_progress(p: Progress) -> None:
        report(p)
        if p.image is not None and every > 0 and p.iteration % every == 0:
            save_image(p.image, path)

    return on_progress


def _stylize_clip(
    args: argparse.Namespace,
    vgg,
    frames: Frames,
    styles: list[GlobalStyle | LocalStyle],
    settings: Settings,
    device: torch.device,
) -> None:
    """The frames of ``--content`` in order, each written to ``--out`` as soon as it is made."""
    video = VideoSettings(
        temporal_weight=args.temporal_weight, later_iterations=args.later_iters, independent=args.independent_frames
    )
    video.validate()
    flow = None
    if not video.independent and len(frames) > 1:
        dirs = args.models_dir or ()
        flow = flow_estimator(
            args.flow, raft_weights=args.raft_weights, models_dirs=dirs, download=True, device=str(device)
        )
    writer = ClipWriter(args.out, frames.fps)
    report = _progress_printer(args.quiet)

    def on_progress(index: int, count: int, p: Progress) -> None:
        if not args.quiet and p.iteration == 1 and p.level == 1:
            print(f"frame {index + 1}/{count}", file=sys.stderr, flush=True)
        report(p)

    try:
        for image in stylize_frames(vgg, frames, styles, settings, video, flow=flow, on_progress=on_progress):
            writer.write(image)
    finally:
        writer.close()  # after a cancel too: the frames made so far are kept


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        clip = is_clip(args.content)
        if not clip:
            check_output_path(args.out)
        elif args.save_every:
            raise FusionError("save-every: not available for clips (each frame is written when it is done)")
        else:
            check_clip_output(args.out)
        if args.save_every < 0:
            raise FusionError(f"save-every: expected a number of iterations >= 0, got {args.save_every}")
        device = pick_device(args.device)
        content = read_clip(args.content) if clip else load_image(args.content, "content")
        styles = style_terms(args)
        # Settings flags have no default here: a flag given is the user's choice and wins over the preset, a flag left
        # out leaves the field to the preset (and the preset to the defaults)
        given = dict(
            init=args.init,
            tv_weight=args.tv_weight,
            match_content=args.match_content,
            match_metric=args.match_metric,
            content_layer=args.content_layer,
            content_weight=args.content_weight,
            size=args.size,
            levels=args.levels,
            iterations=args.iters,
            final_iterations=args.final_iters,
            seed=args.seed,
            optimizer=args.optimizer,
            learning_rate=args.lr,
            color=args.color,
            preview_every=args.save_every,
            matcher=args.matcher,
            rematch_every=args.rematch_every,
            mixed_precision=args.mixed_precision,
            tile=args.tile,
            max_memory=args.max_memory,
        )
        settings = settings_for(args.preset, {name: value for name, value in given.items() if value is not None})
        vgg = load_vgg(
            args.weights,
            convention=args.convention,
            pooling=args.pooling,
            models_dirs=args.models_dir,
            progress=_download_printer(args.quiet),
        ).to(device)
        # The command line owns its process, so it may change its allocator's setting (allocator.py): around levels
        # in tiles, and with a memory budget around the whole run, since the budget is a promise about resident
        # memory and the C allocator's heaps can keep what whole levels free beyond what the plan counts.
        with freed_memory_returned(device, enabled=settings.max_memory > 0):
            if clip:
                _stylize_clip(args, vgg, content, styles, settings, device)
            else:
                on_progress = _saver(args.out, args.save_every, _progress_printer(args.quiet))
                image = stylize(
                    vgg, content, styles, settings, on_progress=on_progress, tiled_level=freed_memory_returned
                )
                save_image(image, args.out)
    except FusionError as error:
        print(f"fusion-style: error: {error}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("fusion-style: stopped", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
