"""Gradient balance of the three loss terms at the defaults (a1 = 20, a2 = 2.5e-5, a3 = 10).

Runs the pyramid up to the last level, then, at the first iteration of the last level, measures the
norm of each weighted term's gradient with respect to the image and prints its share of their sum.

    python benchmarks/balance.py --weights ../shared/models/vgg16_hed_caffe_fp16.safetensors --size 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PAIRS = [
    ("chelsea.png", "starry_night.jpg"),
    ("grace_hopper.jpg", "woman-with-hat-matisse.jpg"),
    ("coffee.png", "shipwreck.jpg"),
    ("astronaut.png", "starry_night.jpg"),
]


class _Measured(Exception):
    """Raised by the level hook once the last level is measured: nothing after it is needed."""


def gradient_shares(vgg, content, style, settings: Settings) -> dict[str, float]:
    """Each term's share of the image gradient's norm at the first iteration of the last level, on the canvas
    that stylize optimises there (the coarse levels' result carried up, with its mirrored margin)."""
    norms = {}

    def measure(level, criterion, canvas):
        if level < settings.levels - 1:
            return
        for kind in ("global", "local", "content"):
            x = canvas.detach().clone().requires_grad_(True)
            criterion(x, rematch=True)[kind].backward()
            norms[kind] = float(x.grad.norm())
        raise _Measured

    with contextlib.suppress(_Measured):
        stylize(vgg, content, [GlobalStyle(style), LocalStyle(style)], settings, on_level=measure)
    total = sum(norms.values())
    return {kind: norm / total for kind, norm in norms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    vgg = load_vgg(args.weights)
    settings = Settings(size=args.size, iterations=args.iters)
    rows = []
    for content_name, style_name in PAIRS:
        content = load_image(SHARED / "images" / content_name)
        style = load_image(SHARED / "images" / style_name)
        shares = gradient_shares(vgg, content, style, settings)
        rows.append(
            {"content_image": content_name, "style_image": style_name, **{k: round(v, 3) for k, v in shares.items()}}
        )
        print(
            f"{content_name:>18} + {style_name:<28} " + "  ".join(f"{k} {v:6.1%}" for k, v in shares.items()),
            flush=True,
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
