"""Does the 16-bit VGG pass cost quality? The default path in float32 and with mixed precision, several seeds.

Each run is the default settings at --size (3 levels of 100 iterations) from one seed, once with
``mixed_precision=False`` (float32 throughout) and once with the default (bfloat16 on a CPU with bfloat16
instructions, float16 on CUDA). Every final image is scored by the same float32 criterion with exact matching,
the measure of bench.py's loss_gap. Two runs from different seeds differ by more than rounding: compare the
precision gap with the spread between seeds.

    PYTHONPATH=. python benchmarks/precision_quality.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core.geometry import level_shapes  # noqa: E402
from fusion_core.precision import mixed_dtype  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402
from fusion_core.targets import build_criterion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--content", default=str(ROOT / "example_images" / "chelsea.png"))
    parser.add_argument("--style", default=str(ROOT / "example_images" / "starry_night.jpg"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    half = mixed_dtype(device)
    if half is None:
        sys.exit(f"mixed precision does not apply on {device} here: nothing to compare")
    vgg = load_vgg(args.weights).to(device)
    content, style = load_image(args.content).to(device), load_image(args.style).to(device)
    styles = [GlobalStyle(style), LocalStyle(style)]
    default = Settings(size=args.size)
    shape = level_shapes(content.shape[-2], content.shape[-1], args.size, default.levels)[-1]
    judge = build_criterion(vgg, content, styles, replace(default, matcher="exact", mixed_precision=False), shape)
    totals: dict[str, list[float]] = {"float32": [], str(half).removeprefix("torch."): []}
    for seed in args.seeds:
        for name, mixed in zip(totals, (False, True), strict=True):
            start = time.perf_counter()
            image = stylize(vgg, content, styles, replace(default, seed=seed, mixed_precision=mixed))
            seconds = time.perf_counter() - start
            with torch.no_grad():
                losses = {k: round(float(v), 3) for k, v in judge(image, rematch=True).items()}
            totals[name].append(losses["total"])
            print(f"seed {seed} {name:>8}: {seconds:4.0f} s, exact-matching float32 losses {losses}", flush=True)
    means = {name: statistics.mean(values) for name, values in totals.items()}
    (reference, mixed), spread = means.values(), statistics.pstdev(next(iter(totals.values())))
    print(f"mean total: {means}; mixed vs float32 {(mixed - reference) / reference:+.2%}")
    print(f"float32 spread between seeds: {spread / reference:.1%} of the mean")


if __name__ == "__main__":
    main()
