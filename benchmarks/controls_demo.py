"""Before/after pictures of each control for the README, made with the trained VGG16.

    PYTHONPATH=. python benchmarks/controls_demo.py --size 256    # the pictures in docs/controls.md

Writes docs/control_*.jpg: each a row of labelled panels (inputs, the default result, the control's result).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core.config import PRESET_WEIGHTS, PRESETS  # noqa: E402
from fusion_core.geometry import fit_longest  # noqa: E402
from fusion_core.images import resize, to_pil  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
ROWS = ["regions", "colour", "blend", "scale", "optimiser"]
PANEL = 200


def panel(image: torch.Tensor, label: str, outline: bool = False) -> Image.Image:
    h, w = fit_longest(image.shape[-2], image.shape[-1], PANEL)
    picture = to_pil(resize(image.clamp(0, 1), (h, w)))
    canvas = Image.new("RGB", (PANEL, PANEL + 18), "white")
    left, top = (PANEL - w) // 2, 18 + (PANEL - h) // 2
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), label, fill="black")
    if outline:  # a mask's white part would vanish into the background
        draw.rectangle((left, top, left + w - 1, top + h - 1), outline="grey")
    return canvas


def row(panels: list[Image.Image], path: Path) -> None:
    strip = Image.new("RGB", (PANEL * len(panels) + 4 * (len(panels) - 1), PANEL + 18), "white")
    for i, p in enumerate(panels):
        strip.paste(p, (i * (PANEL + 4), 0))
    strip.save(path, quality=88)
    print(f"wrote {path}", flush=True)


def fused(style: torch.Tensor, share: float = 1.0, preset: str = "default", **kw) -> list:
    a1, a2 = PRESET_WEIGHTS[preset]["global"], PRESET_WEIGHTS[preset]["local"]
    return [GlobalStyle(style, weight=a1 * share, **kw), LocalStyle(style, weight=a2 * share, **kw)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="which pictures to render")
    args = parser.parse_args()
    rows = set(args.rows)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    vgg = load_vgg(args.weights)
    images = SHARED / "images"
    cat = load_image(images / "chelsea.png")
    starry = load_image(images / "starry_night.jpg")
    matisse = load_image(images / "woman-with-hat-matisse.jpg")
    settings = Settings(size=args.size, iterations=args.iters)
    start = time.monotonic()

    def run(styles, **changes):
        return stylize(vgg, cat, styles, Settings(**{**vars(settings), **changes}))

    default = run(fused(starry)) if rows - {"regions"} else None

    if "regions" in rows:  # Starry Night on the left, Matisse on the right (soft edge)
        h, w = fit_longest(cat.shape[-2], cat.shape[-1], args.size)
        ramp = torch.linspace(-1, 1, w).clamp(-0.15, 0.15) / 0.3 + 0.5
        right = ramp.expand(h, w).contiguous()
        regions = run(fused(starry, target_mask=1 - right) + fused(matisse, target_mask=right))
        panels = [panel(cat, "content"), panel(starry, "style left"), panel(matisse, "style right")]
        panels.append(panel(right.expand(1, 3, h, w), "mask (white: right)", outline=True))
        panels.append(panel(regions, "two styles, two regions"))
        row(panels, out / "control_regions.jpg")

    if "colour" in rows:  # keep the content's colours
        panels = [panel(cat, "content"), panel(starry, "style"), panel(default, "color none (default)")]
        panels += [panel(run(fused(starry), color="luminance"), "color luminance")]
        panels += [panel(run(fused(starry), color="histogram"), "color histogram")]
        row(panels, out / "control_colour.jpg")

    if "blend" in rows:  # several styles blended
        panels = [panel(starry, "style A"), panel(matisse, "style B"), panel(default, "A only")]
        panels += [panel(run(fused(starry, 0.5) + fused(matisse, 0.5)), "blend 0.5 : 0.5")]
        panels += [panel(run(fused(matisse)), "B only")]
        row(panels, out / "control_blend.jpg")

    if "scale" in rows:  # brush strokes relative to the output
        panels = [panel(cat, "content"), panel(starry, "style"), panel(run(fused(starry, scale=0.5)), "scale 0.5")]
        panels += [panel(default, "scale 1 (default)"), panel(run(fused(starry, scale=2.0)), "scale 2")]
        row(panels, out / "control_scale.jpg")

    if "optimiser" in rows:  # start, optimiser and total variation
        panels = [panel(default, "default (recolored start)")]
        panels += [panel(run(fused(starry), init="content"), "init content")]
        panels += [panel(run(fused(starry), tv_weight=0.0), "TV weight 0")]
        panels += [panel(run(fused(starry), optimizer="adam"), "Adam")]
        paper = run(fused(starry, preset="paper"), **PRESETS["paper"])
        panels += [panel(paper, "preset paper (random start)")]
        row(panels, out / "control_optimiser.jpg")
    print(f"done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
