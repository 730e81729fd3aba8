"""Command line: ``python -m fusion_core --content C --style S --out O`` (also ``fusion-style``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .config import GlobalStyle, LocalStyle, Progress, Settings
from .errors import Cancelled, FusionError
from .images import load_image, save_image
from .stylize import stylize
from .weights import load_vgg

_DEFAULTS = Settings()
_GLOBAL, _LOCAL = GlobalStyle(image=None), LocalStyle(image=None)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusion-style",
        description="Neural style transfer fusing a global (Gram) and a local (MRF patch) style loss.",
    )
    p.add_argument("--content", required=True, help="content image file")
    p.add_argument("--style", required=True, help="style image file")
    p.add_argument("--out", required=True, help="output image file (.png, .jpg, ...)")
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
    p.add_argument("--size", type=int, default=_DEFAULTS.size, help="longest side of the output in pixels")
    p.add_argument("--levels", type=int, default=_DEFAULTS.levels, help="coarse-to-fine pyramid levels")
    p.add_argument("--iters", type=int, default=_DEFAULTS.iterations, help="iterations per level")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--global-weight", type=float, default=_GLOBAL.weight, help="a1: Gram (global) style weight")
    p.add_argument("--local-weight", type=float, default=_LOCAL.weight, help="a2: MRF patch (local) style weight")
    p.add_argument("--content-weight", type=float, default=_DEFAULTS.content_weight, help="a3: content weight")
    p.add_argument("--init", default=_DEFAULTS.init, choices=["random", "content"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FusionError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FusionError("device: cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _progress_printer(quiet: bool):
    start = time.monotonic()

    def report(p: Progress) -> None:
        if quiet or not (p.iteration == 1 or p.iteration % 10 == 0 or p.iteration == p.iterations):
            return
        terms = "  ".join(f"{name} {value:.4g}" for name, value in p.losses.items())
        print(
            f"level {p.level}/{p.levels}  iter {p.iteration:>4}/{p.iterations}  [{p.step}/{p.steps}]  "
            f"{terms}  {time.monotonic() - start:.0f}s",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = pick_device(args.device)
        content = load_image(args.content, "content")
        style = load_image(args.style, "style")
        settings = Settings(
            content_weight=args.content_weight,
            size=args.size,
            levels=args.levels,
            iterations=args.iters,
            init=args.init,
            seed=args.seed,
        )
        vgg = load_vgg(
            args.weights,
            convention=args.convention,
            pooling=args.pooling,
            models_dirs=args.models_dir,
            progress=_download_printer(args.quiet),
        ).to(device)
        styles = [GlobalStyle(style, weight=args.global_weight), LocalStyle(style, weight=args.local_weight)]
        image = stylize(vgg, content, styles, settings, on_progress=_progress_printer(args.quiet))
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
