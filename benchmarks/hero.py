"""The README's picture: content, style and the README's main command's result side by side, each titled.

    PYTHONPATH=. python -m fusion_core --content example_images/chelsea.png --style example_images/starry_night.jpg \
        --weights ../shared/models/vgg16_hed_caffe_fp16.safetensors --out out.png
    PYTHONPATH=. python benchmarks/hero.py --result out.png --out docs/readme_hero.jpg   # and --default-out

The result is also written on its own at its size (``--default-out``, BENCHMARKS.md's docs/default_512.jpg).
Nothing is written unless asked: both outputs are named on the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
HEIGHT = 300  # px of each panel
LABEL = 24  # px of the title strip below the panels
GAP = 4


def panels(items: list[tuple[str, Image.Image]]) -> Image.Image:
    """The images at one height, side by side, each with its title below."""
    scaled = [
        (title, image.resize((round(image.width * HEIGHT / image.height), HEIGHT), Image.LANCZOS))
        for title, image in items
    ]
    width = sum(image.width for _, image in scaled) + GAP * (len(scaled) - 1)
    canvas = Image.new("RGB", (width, HEIGHT + LABEL), "white")
    draw = ImageDraw.Draw(canvas)
    left = 0
    for title, image in scaled:
        canvas.paste(image, (left, 0))
        draw.text((left + 4, HEIGHT + 5), title, fill="black", font_size=15)
        left += image.width + GAP
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", required=True, help="the main command's output")
    parser.add_argument("--content", default=str(ROOT / "example_images" / "chelsea.png"))
    parser.add_argument("--style", default=str(ROOT / "example_images" / "starry_night.jpg"))
    parser.add_argument("--title", default="result (defaults, 512 px)")
    parser.add_argument("--out", required=True, help="the side-by-side picture (.jpg)")
    parser.add_argument("--default-out", help="also the result on its own (.jpg)")
    args = parser.parse_args()
    result = Image.open(args.result).convert("RGB")
    items = [
        (f"content: {Path(args.content).name}", Image.open(args.content).convert("RGB")),
        (f"style: {Path(args.style).name}", Image.open(args.style).convert("RGB")),
        (args.title, result),
    ]
    panels(items).save(args.out, quality=88, optimize=True)
    print(f"wrote {args.out}")
    if args.default_out:
        result.save(args.default_out, quality=90, optimize=True)
        print(f"wrote {args.default_out}")


if __name__ == "__main__":
    main()
