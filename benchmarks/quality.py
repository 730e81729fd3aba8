"""Picture quality at the default settings, beside the outputs users know from the classic tools.

Runs ``stylize`` with the library's defaults (a1 = 20, a2 = 1e-4, a3 = 20, 3 levels x 100 iterations, 512 px) on
every pair in ../shared/anchors/pairs.json (each with the output the classic neural-style tool published for it) and
on six pairs of ../shared/images (portraits, an animal, a still life). Every image is measured with the same code
(benchmarks/metrics.py), resized to 256 px on its long side: style SWD, content distance, SSIM and the palette
distance (pixels only, no network). Prints a table per pair and the issue's targets, and writes a contact sheet per
pair: content | style | reference (anchors) | ours.

Anchor files are evaluation data: their sheets go to --out only, never into the repository. --docs also writes the
sheets of the shared pairs and the numbers of every pair (docs/quality_results.json) into docs/.

    PYTHONPATH=. nice -n 19 python benchmarks/quality.py --docs       # the run behind docs/RESULTS.md (~1 h)
    PYTHONPATH=. python benchmarks/quality.py --preset paper           # the paper's own set-up, for comparison
    PYTHONPATH=. python benchmarks/quality.py --size 256 --set init=content --set tv_weight=0   # one choice undone
    PYTHONPATH=. python benchmarks/quality.py --size 128 --iterations 5 --pairs anchor1 animal   # a smoke test

Renders are cached (PNG + JSON, keyed by the settings and the fusion_core source), so a rerun only measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics  # noqa: E402
from compare import font, from_pil, source_digest  # noqa: E402

from fusion_core import GlobalStyle, LocalStyle, load_image, load_vgg  # noqa: E402
from fusion_core.config import PRESETS, preset  # noqa: E402
from fusion_core.geometry import fit_longest  # noqa: E402
from fusion_core.images import resize, to_pil  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MEASURE_SIZE = 256  # every image is measured at this size (long side), as the table was
SHARED_PAIRS = {  # name: (content, style), both in ../shared/images
    "portrait": ("grace_hopper.jpg", "starry_night.jpg"),
    "portrait2": ("astronaut.png", "woman-with-hat-matisse.jpg"),
    "animal": ("chelsea.png", "starry_night.jpg"),
    "animal2": ("chelsea.png", "shipwreck.jpg"),
    "still_life": ("coffee.png", "shipwreck.jpg"),
    "still_life2": ("coffee.png", "woman-with-hat-matisse.jpg"),
}
# The targets of issue 13: on anchors relative to the published output, on shared pairs relative to the photo.
SWD_RATIO, CONTENT_RATIO, PALETTE_RATIO, PALETTE_FLOOR = 1.25, 1.1, 1.5, 0.05


def pairs() -> dict[str, dict]:
    """Every pair: name -> {content, style, reference (anchors only)} as paths."""
    found: dict[str, dict] = {}
    anchors = SHARED / "anchors"
    for i, pair in enumerate(json.loads((anchors / "pairs.json").read_text()), start=1):
        found[f"anchor{i}"] = {
            "content": anchors / pair["content"],
            "style": anchors / pair["style"],
            "reference": anchors / pair["reference"],
        }
    for name, (content, style) in SHARED_PAIRS.items():
        found[name] = {"content": SHARED / "images" / content, "style": SHARED / "images" / style, "reference": None}
    return found


def measure(vgg, output: torch.Tensor, content: torch.Tensor, style: torch.Tensor) -> dict[str, float]:
    """The four numbers of one image, every image at MEASURE_SIZE px on its long side."""
    output = resize(output, fit_longest(output.shape[-2], output.shape[-1], MEASURE_SIZE))
    numbers = metrics.evaluate(vgg, output, content, style)
    keys = ("style_swd", "content_dist", "ssim", "palette_dist")
    return {key: round(float(numbers[key]), 4) for key in keys}


def verdict(ours: dict, reference: dict | None, photo: dict) -> tuple[bool, str]:
    """Whether ``ours`` meets the issue's targets, and the limits it was held to."""
    if reference is None:
        return ours["palette_dist"] < photo["palette_dist"], f"palette < {photo['palette_dist']:.3f} (the photo's)"
    limits = {
        "style_swd": SWD_RATIO * reference["style_swd"],
        "content_dist": CONTENT_RATIO * reference["content_dist"],
        "palette_dist": max(PALETTE_RATIO * reference["palette_dist"], PALETTE_FLOOR),
    }
    ok = all(ours[key] <= limit for key, limit in limits.items())
    return ok, ", ".join(f"{key} <= {limit:.3f}" for key, limit in limits.items())


def sheet(images: list[tuple[str, torch.Tensor | Image.Image]], path: Path, height: int = 384) -> None:
    """The images side by side at one height, each titled."""
    text = 16
    cells = []
    for title, image in images:
        picture = image if isinstance(image, Image.Image) else to_pil(image)
        picture = picture.convert("RGB")
        picture = picture.resize((round(picture.width * height / picture.height), height), Image.LANCZOS)
        cell = Image.new("RGB", (picture.width, height + text + 8), "white")
        cell.paste(picture, (0, 0))
        ImageDraw.Draw(cell).text((4, height + 3), title, fill="black", font=font(text))
        cells.append(cell)
    gap = 4
    canvas = Image.new("RGB", (sum(c.width for c in cells) + gap * (len(cells) - 1), cells[0].height), "white")
    x = 0
    for cell in cells:
        canvas.paste(cell, (x, 0))
        x += cell.width + gap
    canvas.save(path, quality=88, optimize=True)


def row(label: str, numbers: dict) -> str:
    cells = " | ".join(f"{numbers[k]:.3f}" for k in ("style_swd", "content_dist", "ssim", "palette_dist"))
    return f"| {label} | {cells} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--size", type=int, default=None, help="longest side of the output (default: the library's)")
    parser.add_argument("--iterations", type=int, default=None, help="per level (default: the library's)")
    parser.add_argument("--pairs", nargs="+", default=None, help=f"pairs to run (default all: {', '.join(pairs())})")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change one Settings field (JSON value, or a string), e.g. init=random, tv_weight=0, "
        'global_layers=["relu1_2","relu2_2"]',
    )
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "fusion_style_quality"))
    parser.add_argument("--docs", action="store_true", help="also write the shared pairs' sheets and the JSON to docs/")
    args = parser.parse_args()

    everything = pairs()
    chosen = args.pairs or list(everything)
    unknown = [name for name in chosen if name not in everything]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {list(everything)}")
    changes = {k: v for k, v in (("size", args.size), ("iterations", args.iterations)) if v is not None}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
        if isinstance(changes[name], list):
            changes[name] = tuple(changes[name])
    settings = preset(args.preset, **changes)
    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    digest = source_digest()
    vgg = load_vgg(args.weights)
    print(
        f"settings: preset {args.preset}, size {settings.size}, {settings.levels} levels x {settings.iterations} "
        f"iterations, init {settings.init}, tv {settings.tv_weight:g}, local on all levels "
        f"{settings.local_all_levels}, Gram layers {settings.global_layers or 'default'}; changes {args.set}; "
        f"weights {Path(args.weights).name}; "
        f"fusion_core {digest}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results: dict[str, dict] = {}
    tables, failures = [], []
    started = time.perf_counter()
    for name in chosen:
        pair = everything[name]
        content, style = load_image(pair["content"]), load_image(pair["style"])
        fields = [name, args.preset, *(f"{k}={v}" for k, v in sorted(dataclasses.asdict(settings).items())), digest]
        key = hashlib.sha256("|".join(map(str, fields)).encode()).hexdigest()[:16]
        png, record_path = cache / f"{name}_{key}.png", cache / f"{name}_{key}.json"
        if png.is_file() and record_path.is_file():
            ours, seconds = from_pil(Image.open(png)), json.loads(record_path.read_text())["seconds"]
        else:
            start = time.perf_counter()
            ours = stylize(vgg, content, [GlobalStyle(style), LocalStyle(style)], settings)
            seconds = round(time.perf_counter() - start, 1)
            to_pil(ours).save(png)
            ours = from_pil(Image.open(png))  # measured as the file holds it (8 bit)
            record_path.write_text(json.dumps({"pair": name, "seconds": seconds}))
        record = {
            "content": pair["content"].name,
            "style": pair["style"].name,
            "seconds": seconds,
            "ours": measure(vgg, ours, content, style),
            "photo": measure(vgg, content, content, style),
        }
        reference = None
        if pair["reference"] is not None:
            reference = load_image(pair["reference"])
            record["reference"] = measure(vgg, reference, content, style)
        ok, limits = verdict(record["ours"], record.get("reference"), record["photo"])
        record.update(meets_targets=ok, targets=limits)
        results[name] = record
        if not ok:
            failures.append(name)

        images = [(f"content: {pair['content'].name}", content), (f"style: {pair['style'].name}", style)]
        if reference is not None:
            images.append(("reference (neural-style, VGG19)", reference))
        images.append((f"ours ({', '.join([args.preset, *args.set])})", ours))
        sheet(images, out / f"quality_{name}.jpg")
        if args.docs and pair["reference"] is None:
            sheet(images, ROOT / "docs" / f"quality_{name}.jpg")

        lines = [
            f"**{name}**: {pair['content'].name} + {pair['style'].name} ({seconds:.0f} s)",
            "",
            "| image | style SWD | content dist | SSIM | palette dist |",
            "|---|---|---|---|---|",
            row("ours", record["ours"]),
        ]
        if "reference" in record:
            lines.append(row("reference (neural-style)", record["reference"]))
        lines += [row("the photo itself", record["photo"]), "", f"targets ({limits}): {'met' if ok else 'NOT met'}"]
        tables.append("\n".join(lines))
        print(tables[-1] + "\n", flush=True)

    summary = {
        "command": "PYTHONPATH=. python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "preset": args.preset,
        "changes": args.set,
        "weights": Path(args.weights).name,
        "fusion_core_digest": digest,
        "measured_at": MEASURE_SIZE,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "pairs": results,
    }
    (out / "quality_results.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.docs:
        (ROOT / "docs" / "quality_results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(chosen) - len(failures)} of {len(chosen)} pairs meet their targets; sheets in {out}")
    if failures:
        print(f"not met: {', '.join(failures)}")


if __name__ == "__main__":
    main()
