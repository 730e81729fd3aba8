"""Picture quality at the default settings, beside the outputs users know from the classic tools.

Runs ``stylize`` with the library's defaults on three groups of pairs:

- the six anchor pairs of ../shared/anchors/pairs.json, each with the output the classic neural-style tool published;
- six pairs of ../shared/images (portraits, an animal, a still life);
- motif pairs: portraits and other paintings with strong local motifs (eyes, mouths, animals' faces, a moon) as
  styles over landscapes, water and sky, the pairs where a nearest-patch loss pastes a face into a bay
  (benchmarks/pairs/, SOURCES.md; Frida Kahlo's self-portrait from ../shared/anchors), and unseen pairs: paintings
  with large forms over photos not in ../shared.

Every image is measured with the same code (benchmarks/metrics.py), resized to 256 px on its long side: style SWD,
content distance, SSIM and the palette distance (pixels only, no network); at the output's own size: the motif share
(copies of the painting's motifs, for paintings with motif boxes in benchmarks/pairs/motifs.json) and the worst tiles
of the local content distance. With ``--gatys`` every pair without a published reference is also rendered with a plain
Gatys run on the same network (content start, Gram on relu1_1..relu5_1, content on relu4_2, one level of 500 L-BFGS
iterations at 512 px), the bar for those pairs. Prints a table per pair and its targets, and writes a contact sheet
per pair: content | style | reference or Gatys | ours, above 1:1 crops beside the same crops of the content and the
reference or Gatys output: where ours has the most copies of the painting's motifs (motif pairs), then ours' worst
tiles of the local content distance.

Targets (issues 13 and 30): on anchors, style SWD <= 1.25x, content <= 1.1x and palette <= max(1.5x, 0.05) of the
published output's; on every other pair, palette below the unstylised photo's and, with ``--gatys``, style SWD <=
1.25x and content <= 1.1x of the Gatys run's, and a motif share no higher than MOTIF_RATIO x the Gatys run's (plus
MOTIF_SLACK, for pairs where it is near 0).

Anchor files are evaluation data: their sheets go to --out only, never into the repository. --docs also writes the
sheets of the other pairs and the numbers of every pair (docs/quality_results.json) into docs/.

    PYTHONPATH=. nice -n 19 python benchmarks/quality.py --gatys --docs   # the run behind docs/RESULTS.md (~3 h)
    PYTHONPATH=. python benchmarks/quality.py --group motif --gatys      # the motif pairs
    PYTHONPATH=. python benchmarks/quality.py --preset paper           # the paper's own set-up, for comparison
    PYTHONPATH=. python benchmarks/quality.py --size 256 --set init=content --set tv_weight=0   # one choice undone
    PYTHONPATH=. python benchmarks/quality.py --size 128 --iterations 5 --pairs anchor1 animal   # a smoke test

Renders are cached (PNG + JSON, keyed by the settings and the fusion_core source), so a rerun only measures. The
Gatys renders are keyed by their settings and the weights alone: they use only the Gram and content terms and the
optimiser, so a change elsewhere in the library keeps them (delete the cache's gatys_* files to render them again).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics  # noqa: E402
from compare import font, from_pil, source_digest  # noqa: E402
from settings_args import setting_changes  # noqa: E402

from fusion_core import GlobalStyle, LocalStyle, load_image, load_vgg  # noqa: E402
from fusion_core.choices import term_weight  # noqa: E402
from fusion_core.config import GLOBAL_LAYERS, PRESETS, Settings, preset  # noqa: E402
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
PAIRS_DIR = ROOT / "benchmarks" / "pairs"  # images not in ../shared (SOURCES.md)
# name: (content, style), relative to the repository's root; "shared/" is ../shared. The first two are the issue's
# own examples; the fix for misplaced motifs was developed on them, and the other motif pairs are held out.
NEW_PAIRS = {
    "motif_tubingen": ("shared/anchors/tubingen.jpg", "shared/anchors/frida_kahlo.jpg"),
    "motif_golden_gate": ("shared/anchors/golden_gate.jpg", "shared/anchors/frida_kahlo.jpg"),
    "motif_mona_lisa": ("benchmarks/pairs/lake_sunset_boats.jpg", "benchmarks/pairs/mona_lisa.jpg"),
    "motif_pearl": ("benchmarks/pairs/coast_bells_beach.jpg", "benchmarks/pairs/girl_with_pearl_earring.jpg"),
    "motif_van_gogh": ("benchmarks/pairs/lake_night_sky.jpg", "benchmarks/pairs/van_gogh_self_portrait_1889.jpg"),
    "motif_raphael": ("benchmarks/pairs/mountains_picos_de_europa.jpg", "benchmarks/pairs/raphael_self_portrait.jpg"),
    "motif_gypsy": ("benchmarks/pairs/hilltop_sunset.jpg", "benchmarks/pairs/sleeping_gypsy.jpg"),
    "unseen_river_starry": ("shared/anchors/tubingen.jpg", "shared/images/starry_night.jpg"),
    "unseen_wave": ("benchmarks/pairs/dune_sea.jpg", "benchmarks/pairs/great_wave.jpg"),
    "unseen_gauguin": ("benchmarks/pairs/lake_sunset_boats.jpg", "benchmarks/pairs/gauguin_tahitian_women.jpg"),
}
MOTIFS = json.loads((PAIRS_DIR / "motifs.json").read_text())  # painting file name -> motif boxes
# The targets of issue 13: on anchors relative to the published output, on shared pairs relative to the photo.
SWD_RATIO, CONTENT_RATIO, PALETTE_RATIO, PALETTE_FLOOR = 1.25, 1.1, 1.5, 0.05
# Issue 30's motif target, relative to the plain Gatys output of the same pair (which pastes no motif).
MOTIF_RATIO, MOTIF_SLACK = 1.25, 0.002
GATYS_ITERATIONS = 500
# The plain Gatys run's a1 and a3, fixed here so that the bar does not move with our defaults: the defaults' own
# balance of Gram and content terms (the paper's a3 = 20 keeps more of the photo and paints far less than the
# classic tool's published outputs do), so the comparison is of the methods, not of the weights.
GATYS_STYLE_WEIGHT, GATYS_CONTENT_WEIGHT = 20.0, 10.0
CROPS, CROP = 3, 128  # worst tiles shown per pair, and the side of their 1:1 crops (px)


def _path(relative: str) -> Path:
    return SHARED / relative.removeprefix("shared/") if relative.startswith("shared/") else ROOT / relative


def pairs() -> dict[str, dict]:
    """Every pair: name -> {content, style, reference (anchors only), group} as paths."""
    found: dict[str, dict] = {}
    anchors = SHARED / "anchors"
    for i, pair in enumerate(json.loads((anchors / "pairs.json").read_text()), start=1):
        found[f"anchor{i}"] = {
            "content": anchors / pair["content"],
            "style": anchors / pair["style"],
            "reference": anchors / pair["reference"],
            "group": "anchor",
        }
    for name, (content, style) in SHARED_PAIRS.items():
        found[name] = {
            "content": SHARED / "images" / content,
            "style": SHARED / "images" / style,
            "reference": None,
            "group": "shared",
        }
    for name, (content, style) in NEW_PAIRS.items():
        group = "motif" if name.startswith("motif") else "unseen"
        found[name] = {"content": _path(content), "style": _path(style), "reference": None, "group": group}
    return found


def gatys(vgg, content: torch.Tensor, style: torch.Tensor, size: int, iterations: int) -> torch.Tensor:
    """A plain Gatys et al. run on ``vgg``: the content as the start, the Gram loss on relu1_1..relu5_1 and the content
    loss on relu4_2 at GATYS_STYLE_WEIGHT and GATYS_CONTENT_WEIGHT, one level of ``iterations`` L-BFGS iterations,
    a little total variation against pixel noise, no local term, no recolouring."""
    settings = Settings(
        size=size,
        levels=1,
        iterations=iterations,
        final_iterations=0,  # the one level is the last: all ``iterations`` there, not the defaults' shorter last level
        init="content",
        content_weight=GATYS_CONTENT_WEIGHT,
        content_layer="relu4_2",
        tv_weight=1.0,
        global_layers=GLOBAL_LAYERS,
    )
    return stylize(vgg, content, [GlobalStyle(style, weight=GATYS_STYLE_WEIGHT)], settings)


def measure(vgg, output: torch.Tensor, content: torch.Tensor, style: torch.Tensor, motifs: list | None) -> dict:
    """The numbers of one image: style SWD, content distance, SSIM and palette distance with every image at
    MEASURE_SIZE px on its long side; the motif share (with ``motifs``, the painting's boxes) and the worst tile of the
    local content distance at the image's own size."""
    small = resize(output, fit_longest(output.shape[-2], output.shape[-1], MEASURE_SIZE))
    numbers = metrics.evaluate(vgg, small, content, style)
    found = {key: round(float(numbers[key]), 4) for key in ("style_swd", "content_dist", "ssim", "palette_dist")}
    if motifs:
        found["motif_share"] = round(metrics.motif_share(vgg, output, style, motifs, content), 5)
    found["worst_tile"] = round(float(metrics.local_content_distance(vgg, output, content).max()), 3)
    return found


def verdict(ours: dict, reference: dict | None, photo: dict, gatys: dict | None = None) -> tuple[bool, str]:
    """Whether ``ours`` meets the targets, and the limits it was held to: against the published ``reference`` where
    there is one, else against the photo's palette and (when given) the plain ``gatys`` run's numbers."""
    if reference is not None:
        limits = {
            "style_swd": SWD_RATIO * reference["style_swd"],
            "content_dist": CONTENT_RATIO * reference["content_dist"],
            "palette_dist": max(PALETTE_RATIO * reference["palette_dist"], PALETTE_FLOOR),
        }
    else:
        limits = {"palette_dist": photo["palette_dist"]}
        if gatys is not None:
            limits.update(style_swd=SWD_RATIO * gatys["style_swd"], content_dist=CONTENT_RATIO * gatys["content_dist"])
            if "motif_share" in ours:
                limits["motif_share"] = MOTIF_RATIO * gatys["motif_share"] + MOTIF_SLACK
    ok = all(ours[key] <= limit for key, limit in limits.items())
    return ok, ", ".join(f"{key} <= {limit:.4g}" for key, limit in limits.items())


def _cells(images: list[tuple[str, Image.Image]], height: int | None, text: int = 16) -> list[Image.Image]:
    """Each image titled below; resized to ``height`` unless None (1:1)."""
    cells = []
    for title, picture in images:
        picture = picture.convert("RGB")
        if height is not None:
            picture = picture.resize((round(picture.width * height / picture.height), height), Image.LANCZOS)
        cell = Image.new("RGB", (max(picture.width, 8 * len(title) // 2), picture.height + text + 8), "white")
        cell.paste(picture, (0, 0))
        ImageDraw.Draw(cell).text((4, picture.height + 3), title, fill="black", font=font(text))
        cells.append(cell)
    return cells


def _row(cells: list[Image.Image], gap: int = 4) -> Image.Image:
    canvas = Image.new("RGB", (sum(c.width for c in cells) + gap * (len(cells) - 1), max(c.height for c in cells)))
    canvas.paste((255, 255, 255), (0, 0, *canvas.size))
    x = 0
    for cell in cells:
        canvas.paste(cell, (x, 0))
        x += cell.width + gap
    return canvas


def _corners(scores: torch.Tensor, step: int, shape: tuple[int, int], count: int, taken: list) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of CROP px crops centred on the best-scoring cells of ``scores`` (a grid of cells
    ``step`` px apart over an image of ``shape``), highest first, none overlapping another by half or more, after
    the corners already ``taken``."""
    height, width = shape
    corners = list(taken)
    for index in scores.flatten().argsort(descending=True).tolist():
        if len(corners) - len(taken) == count or float(scores.flatten()[index]) <= 0:
            break
        row, col = divmod(index, scores.shape[1])
        y = min(max(0, row * step + step // 2 - CROP // 2), max(0, height - CROP))
        x = min(max(0, col * step + step // 2 - CROP // 2), max(0, width - CROP))
        if all(abs(y - a) >= CROP // 2 or abs(x - b) >= CROP // 2 for a, b in corners):
            corners.append((y, x))
    return corners[len(taken) :]


def crop_corners(vgg, output: torch.Tensor, content: torch.Tensor, style: torch.Tensor, motifs: list | None) -> list:
    """Where to look at 1:1, CROPS crops of ``output``: for a painting with motif boxes, first the windows with the
    most copies of its motifs (``metrics.motif_copies``), then the worst tiles of the local content distance."""
    shape = tuple(output.shape[-2:])
    corners: list[tuple[int, int]] = []
    if motifs:
        copies = metrics.motif_copies(vgg, output, style, motifs, content).float()[None, None]
        # copies per crop-sized window around each patch (relu3_1 patches are 4 px apart, centred 4 px in)
        density = torch.nn.functional.avg_pool2d(copies, CROP // 4, stride=1, padding=CROP // 8)[0, 0]
        density = torch.nn.functional.pad(density, (1, 0, 1, 0))
        corners += _corners(density, 4, shape, CROPS - 1, corners)
    tiles = metrics.local_content_distance(vgg, output, content)
    corners += _corners(tiles, 8 * metrics.TILE_POSITIONS, shape, CROPS - len(corners), corners)
    return corners


def sheet(
    images: list[tuple[str, torch.Tensor]], path: Path, crops: list[tuple[int, int]] = (), height: int = 384
) -> None:
    """The images side by side at one height, each titled; below, for each crop corner, the same CROP px crop of
    every image but the style (the second) at 1:1, each image at the last image's size first."""
    pictures = [(title, to_pil(image)) for title, image in images]
    rows = [_row(_cells(pictures, height))]
    size = pictures[-1][1].size
    for y, x in crops:
        crop = [
            (
                f"{title.split(':')[0].split(' (')[0]} @ {x},{y}",
                picture.resize(size, Image.LANCZOS).crop((x, y, x + CROP, y + CROP)),
            )
            for i, (title, picture) in enumerate(pictures)
            if i != 1
        ]
        rows.append(_row(_cells(crop, None, text=12)))
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height for r in rows) + 8 * (len(rows) - 1)), "white")
    top = 0
    for r in rows:
        canvas.paste(r, (0, top))
        top += r.height + 8
    canvas.save(path, quality=88, optimize=True)


def row(label: str, numbers: dict) -> str:
    keys = ("style_swd", "content_dist", "ssim", "palette_dist")
    cells = " | ".join(f"{numbers[k]:.3f}" for k in keys)
    extra = f" | {numbers['motif_share']:.4f}" if "motif_share" in numbers else " | -"
    return f"| {label} | {cells}{extra} | {numbers.get('worst_tile', float('nan')):.2f} |"


def cached_render(path_stem: Path, render) -> tuple[torch.Tensor, float]:
    """``render()`` once: the image (as its 8-bit PNG holds it) and the seconds it took, from the cache when there."""
    png, record_path = path_stem.with_suffix(".png"), path_stem.with_suffix(".json")
    if png.is_file() and record_path.is_file():
        return from_pil(Image.open(png)), json.loads(record_path.read_text())["seconds"]
    start = time.perf_counter()
    image = render()
    seconds = round(time.perf_counter() - start, 1)
    to_pil(image).save(png)
    record_path.write_text(json.dumps({"seconds": seconds}))
    return from_pil(Image.open(png)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--size", type=int, default=None, help="longest side of the output (default: the library's)")
    parser.add_argument("--iterations", type=int, default=None, help="per level (default: the library's)")
    parser.add_argument("--pairs", nargs="+", default=None, help=f"pairs to run (default all: {', '.join(pairs())})")
    parser.add_argument("--group", choices=["anchor", "shared", "motif", "unseen"], action="append", default=None)
    parser.add_argument("--global-weight", type=float, help="a1 (default: the preset's)")
    parser.add_argument("--local-weight", type=float, help="a2 (default: the preset's)")
    parser.add_argument("--gatys", action="store_true", help="also render and measure the plain Gatys run per pair")
    parser.add_argument("--gatys-iterations", type=int, default=GATYS_ITERATIONS)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change one Settings field (JSON value, or a string), e.g. init=random, tv_weight=0, "
        'global_layers=["relu1_2","relu2_2"]',
    )
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "fusion_style_quality"))
    parser.add_argument("--docs", action="store_true", help="also write the other pairs' sheets and the JSON to docs/")
    args = parser.parse_args()

    everything = pairs()
    chosen = args.pairs or [name for name, pair in everything.items() if not args.group or pair["group"] in args.group]
    unknown = [name for name in chosen if name not in everything]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {list(everything)}")
    changes = {k: v for k, v in (("size", args.size), ("iterations", args.iterations)) if v is not None}
    changes.update(setting_changes(args.set))
    settings = preset(args.preset, **changes)
    args.global_weight = term_weight(args.preset, "global", args.global_weight)
    args.local_weight = term_weight(args.preset, "local", args.local_weight)
    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    digest = source_digest()
    vgg = load_vgg(args.weights)
    print(
        f"settings: preset {args.preset}, size {settings.size}, {settings.levels} levels x {settings.iterations} "
        f"iterations (last {settings.level_iterations(settings.levels - 1)}), init {settings.init}, "
        f"a1 {args.global_weight:g}, a2 {args.local_weight:g}, a3 {settings.content_weight:g}, "
        f"tv {settings.tv_weight:g}, match_content {settings.match_content:g}, local on all levels "
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
        motifs = MOTIFS.get(pair["style"].name)
        fields = [name, args.preset, *(f"{k}={v}" for k, v in sorted(dataclasses.asdict(settings).items())), digest]
        fields += [args.global_weight, args.local_weight]
        key = hashlib.sha256("|".join(map(str, fields)).encode()).hexdigest()[:16]
        terms = [GlobalStyle(style, weight=args.global_weight), LocalStyle(style, weight=args.local_weight)]
        ours, seconds = cached_render(cache / f"{name}_{key}", partial(stylize, vgg, content, terms, settings))
        record = {
            "content": pair["content"].name,
            "style": pair["style"].name,
            "group": pair["group"],
            "seconds": seconds,
            "ours": measure(vgg, ours, content, style, motifs),
            "photo": measure(vgg, content, content, style, None),
        }
        images = [(f"content: {pair['content'].name}", content), (f"style: {pair['style'].name}", style)]
        reference = gatys_run = None
        if pair["reference"] is not None:
            reference = load_image(pair["reference"])
            record["reference"] = measure(vgg, reference, content, style, motifs)
            images.append(("reference (neural-style, VGG19)", reference))
        elif args.gatys:
            gatys_fields = [name, settings.size, args.gatys_iterations, Path(args.weights).name, "gatys-v2"]
            gatys_key = hashlib.sha256("|".join(map(str, gatys_fields)).encode()).hexdigest()[:16]
            gatys_run, gatys_seconds = cached_render(
                cache / f"gatys_{name}_{gatys_key}",
                partial(gatys, vgg, content, style, settings.size, args.gatys_iterations),
            )
            record["gatys"] = measure(vgg, gatys_run, content, style, motifs)
            record["gatys"]["seconds"] = gatys_seconds
            images.append((f"plain Gatys ({args.gatys_iterations} L-BFGS iterations)", gatys_run))
        ok, limits = verdict(record["ours"], record.get("reference"), record["photo"], record.get("gatys"))
        record.update(meets_targets=ok, targets=limits)
        results[name] = record
        if not ok:
            failures.append(name)

        images.append((f"ours ({', '.join([args.preset, *args.set])})", ours))
        crops = crop_corners(vgg, ours, content, style, motifs)
        record["crops"] = crops
        sheet(images, out / f"quality_{name}.jpg", crops)
        # the anchors' images are evaluation data: no sheet that shows one goes into the repository
        from_anchors = any(SHARED / "anchors" in pair[key].parents for key in ("content", "style"))
        if args.docs and pair["group"] != "anchor" and not from_anchors:
            sheet(images, ROOT / "docs" / f"quality_{name}.jpg", crops)

        lines = [
            f"**{name}**: {pair['content'].name} + {pair['style'].name} ({seconds:.0f} s)",
            "",
            "| image | style SWD | content dist | SSIM | palette dist | motif share | worst tile |",
            "|---|---|---|---|---|---|---|",
            row("ours", record["ours"]),
        ]
        if "reference" in record:
            lines.append(row("reference (neural-style)", record["reference"]))
        if "gatys" in record:
            lines.append(row("plain Gatys", record["gatys"]))
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
