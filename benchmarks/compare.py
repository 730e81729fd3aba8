"""The paper's comparisons, reproduced with the trained VGG16: global only vs local only vs fusion, and the a2 sweep.

For every content/style pair: content | style | global only | local only | fusion, at the same size, seed and
iteration budget, with numbers under each picture (benchmarks/metrics.py: style SWD, lower = closer to the style;
patch distance P, lower = more of the style's local detail; content distance, lower = closer to the content; SSIM of
luminance, higher = closer to the content; palette distance, pixels only, lower = closer to the painting's colours).
Every other setting is the library's default (or the paper's own set-up with --preset paper). For one pair,
the a2 sweep 1e-1 ... 1e-6 at the defaults' a1 and a3 (the paper's Figure 8), beside a2 = 0 (global only).

Writes docs/compare_<pair>.jpg, docs/sweep_<pair>.jpg and docs/compare_results.json, and prints markdown tables.
Renders are cached (PNG + JSON per render, keyed by the settings and the fusion_core source) so an interrupted run
resumes where it stopped.

    PYTHONPATH=. nice -n 19 python benchmarks/compare.py            # the run behind docs/RESULTS.md
    PYTHONPATH=. python benchmarks/compare.py --size 64 --levels 1 --iterations 5 --out /tmp/cmp   # a smoke test
    (--size 64 with 3 levels is too small for relu5_1; the run says so)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics  # noqa: E402

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core.config import PRESETS, preset  # noqa: E402
from fusion_core.geometry import fit_longest  # noqa: E402
from fusion_core.images import resize, to_pil  # noqa: E402
from fusion_core.losses import CONTENT_SCALE, LOCAL_SCALE  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402
from fusion_core.targets import build_criterion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PAIRS = {  # name: (content, style)
    "portrait": ("grace_hopper.jpg", "woman-with-hat-matisse.jpg"),
    "animal": ("chelsea.png", "starry_night.jpg"),
    "scene": ("coffee.png", "shipwreck.jpg"),
}
METHODS = ("global", "local", "fusion")
SWEEP_A2 = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
A1, A2 = GlobalStyle.__dataclass_fields__["weight"].default, LocalStyle.__dataclass_fields__["weight"].default


def style_terms(method: str, style: torch.Tensor, a1: float = A1, a2: float = A2) -> list:
    return {
        "global": [GlobalStyle(style, weight=a1)],
        "local": [LocalStyle(style, weight=a2)],
        "fusion": [GlobalStyle(style, weight=a1), LocalStyle(style, weight=a2)],
    }[method]


def source_digest() -> str:
    """Hash of fusion_core's sources: a cached render is reused only while the library is unchanged."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "fusion_core").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def git(*command: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *command], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def from_pil(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


class Renderer:
    """Runs ``stylize`` once per (pair, method, a1, a2, seed), caching the image and its numbers."""

    def __init__(self, vgg, images: dict[str, torch.Tensor], settings: Settings, cache: Path):
        self.vgg, self.images, self.settings, self.cache = vgg, images, settings, cache
        cache.mkdir(parents=True, exist_ok=True)
        self.digest = source_digest()
        self.records: dict[str, dict] = {}  # every render this run used, by cache key

    def run(
        self, pair: str, method: str, *, a1: float = A1, a2: float = A2, seed: int | None = None
    ) -> tuple[torch.Tensor, dict]:
        seed = self.settings.seed if seed is None else seed
        a1, a2 = (0.0 if method == "local" else a1), (0.0 if method == "global" else a2)
        content_name, style_name = PAIRS[pair]
        content, style = self.images[content_name], self.images[style_name]
        s = self.settings
        fields = [pair, method, f"{a1:g}", f"{a2:g}", s.size, s.levels, s.iterations, seed, s.matcher, s.rematch_every]
        fields += [s.init, f"{s.tv_weight:g}", int(s.local_all_levels), "-".join(s.global_layers or ())]
        fields += [f"{s.content_weight:g}", s.final_iterations, f"{s.match_content:g}"]
        key = "_".join(str(f) for f in [*fields, self.digest])
        png, record_path = self.cache / f"{key}.png", self.cache / f"{key}.json"
        if png.is_file() and record_path.is_file():
            image, record = from_pil(Image.open(png)), json.loads(record_path.read_text())
            if "palette_dist" not in record:  # rendered before that measure existed: measure again, keep the render
                record.update(self.measure(image, content, style))
                record_path.write_text(json.dumps(record, indent=1))
            self.records[key] = record
            return image, record
        settings = dataclasses.replace(self.settings, seed=seed)
        last: dict[str, float] = {}
        start = time.perf_counter()
        image = stylize(
            self.vgg, content, style_terms(method, style, a1, a2), settings, on_progress=lambda p: last.update(p.losses)
        )
        seconds = time.perf_counter() - start
        image = from_pil(to_pil(image))  # measured as the file holds it (8 bit), so cached and fresh runs agree
        record = {
            "pair": pair,
            "content_image": content_name,
            "style_image": style_name,
            "method": method,
            "a1": a1,
            "a2": a2,
            "a3": settings.content_weight,
            "seed": seed,
            "seconds": round(seconds, 1),
            "final_losses": {k: round(v, 5) for k, v in last.items()},
            **self.measure(image, content, style),
        }
        to_pil(image).save(png)
        record_path.write_text(json.dumps(record, indent=1))
        self.records[key] = record
        print(f"  rendered {key} in {seconds:.0f} s", file=sys.stderr, flush=True)
        return image, record

    def measure(self, image: torch.Tensor, content: torch.Tensor, style: torch.Tensor) -> dict:
        numbers = metrics.evaluate(self.vgg, image, content, style)
        numbers = {k: round(v, 4) if isinstance(v, float) else v for k, v in numbers.items()}
        numbers["style_swd_layers"] = {k: round(v, 4) for k, v in numbers["style_swd_layers"].items()}
        # Not independent (these are the optimised losses), kept for diagnosis: every output measured with the
        # fusion objective's unweighted terms at the last level (the local term re-matched on the output).
        shape = tuple(image.shape[-2:])
        criterion = build_criterion(self.vgg, content, style_terms("fusion", style), self.settings, shape)
        with torch.no_grad():
            values = criterion(image, rematch=True)
        numbers["loss_terms_unweighted"] = {
            "gram": round(float(values["global"]) / A1, 5),
            "mrf": round(float(values["local"]) / A2, 5),
            "content": round(float(values["content"]) / self.settings.content_weight, 5),
        }
        return numbers


# --- pictures ---


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def caption(numbers: dict | None) -> str:
    if numbers is None:
        return ""
    return (
        f"SWD {numbers['style_swd']:.3f}  P {numbers['patch_dist']:.3f}  dC {numbers['content_dist']:.3f}\n"
        f"SSIM {numbers['ssim']:.3f}  palette {numbers['palette_dist']:.3f}"
    )


def tile(image: torch.Tensor, box: tuple[int, int], title: str, line: str) -> Image.Image:
    """The image fitted in a (width, height) box, with a title and lines of numbers below."""
    width, height = box
    text = max(10, width // 22)
    lines = [title, *line.split("\n")]
    cell = Image.new("RGB", (width, height + len(lines) * (text + 3) + 4), "white")
    picture = to_pil(image)
    picture.thumbnail((width, height), Image.LANCZOS)
    cell.paste(picture, ((width - picture.width) // 2, (height - picture.height) // 2))
    draw = ImageDraw.Draw(cell)
    for i, words in enumerate(lines):
        draw.text((4, height + 2 + i * (text + 3)), words, fill="black", font=font(text))
    return cell


def strip(tiles: list[Image.Image], path: Path, quality: int) -> None:
    gap = 4
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + gap
    canvas.save(path, quality=quality, optimize=True)


# --- tables ---


def row(label: str, r: dict) -> str:
    time_s = f"{r['seconds']:.0f}" if "seconds" in r else "-"
    cells = " | ".join(f"{r[k]:.3f}" for k in ("style_swd", "patch_dist", "content_dist", "ssim", "palette_dist"))
    return f"| {label} | {cells} | {time_s} |"


HEADER = (
    "| {} | style SWD (lower = closer to style) | patch dist (lower = more style detail) "
    "| content dist (lower = closer) | SSIM (higher = closer) | palette dist (lower = closer to style) | s |"
)
RULE = "|---|---|---|---|---|---|---|"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--images", default=str(SHARED / "images"), help="folder holding the content/style images")
    parser.add_argument(
        "--preset", choices=list(PRESETS), default="default", help="the library's or the paper's set-up"
    )
    parser.add_argument("--size", type=int, default=256, help="longest side of the output (default 256)")
    parser.add_argument("--levels", type=int, default=3, help="pyramid levels (default 3)")
    parser.add_argument("--iterations", type=int, help="L-BFGS iterations per level (default: the library's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the JPEGs and the JSON (default docs/)")
    parser.add_argument("--cache", default=None, help="cached renders (default: <temp>/fusion_style_compare)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--sweep-pair", choices=[*PAIRS, "none"], default="animal", help="pair of the a2 sweep")
    parser.add_argument(
        "--spread-seeds",
        type=int,
        nargs="*",
        default=[],
        help="extra seeds for global/local/fusion on the sweep pair: how much the numbers move with the seed alone",
    )
    parser.add_argument(
        "--a1-sweep",
        type=float,
        nargs="*",
        default=[80.0, 320.0],
        help="global only with these a1 on the sweep pair: does more Gram weight alone reach fusion's style distance?",
    )
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images_dir = Path(args.images)
    names = {name for pair in args.pairs + [args.sweep_pair] if pair in PAIRS for name in PAIRS[pair]}
    images = {name: load_image(images_dir / name) for name in sorted(names)}
    vgg = load_vgg(args.weights)
    changes = {} if args.iterations is None else {"iterations": args.iterations}
    settings = preset(args.preset, size=args.size, levels=args.levels, seed=args.seed, **changes)
    renderer = Renderer(vgg, images, settings, Path(args.cache or Path(tempfile.gettempdir()) / "fusion_style_compare"))
    started = time.perf_counter()
    results: dict = {
        "command": "PYTHONPATH=. python benchmarks/compare.py " + " ".join(sys.argv[1:]),
        "commit": git("log", "-1", "--format=%h %s"),
        "fusion_core_uncommitted_changes": git("status", "--porcelain", "fusion_core").splitlines(),
        "fusion_core_digest": renderer.digest,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "weights": Path(args.weights).name,
        "preset": args.preset,
        "settings": {k: v for k, v in vars(settings).items()},
        "defaults": {"a1": A1, "a2": A2, "LOCAL_SCALE": LOCAL_SCALE, "CONTENT_SCALE": CONTENT_SCALE},
        "metrics": {
            "style_swd": f"sliced W2 on {', '.join(metrics.STYLE_LAYERS)}, {metrics.PROJECTIONS} projections (seed "
            f"{metrics.SEED}), each over the style's RMS activation, mean over layers; lower = closer to the style",
            "content_dist": f"||{metrics.CONTENT_LAYER}(out) - {metrics.CONTENT_LAYER}(content)|| / "
            f"||{metrics.CONTENT_LAYER}(content)||; lower = closer to the content",
            "ssim": "SSIM of BT.601 luminance against the content, Gaussian window 11, sigma 1.5; higher = closer",
            "patch_dist": "1 - mean cosine of each output 3x3 patch with its most similar style patch (exhaustive), "
            f"on "
            f"{', '.join(metrics.PATCH_LAYERS)}, mean over layers; lower = more style-like local detail",
            "palette_dist": f"sliced W2 between the RGB pixels of output and style, both at {metrics.PALETTE_SIZE} px; "
            "lower = closer to the painting's colours",
        },
        "pairs": {},
        "sweep": None,
        "a1_sweep": None,
        "spread": None,
    }
    tables = []

    for pair in args.pairs:
        content_name, style_name = PAIRS[pair]
        content, style = images[content_name], images[style_name]
        shape = fit_longest(content.shape[-2], content.shape[-1], args.size)
        box = (args.size, shape[0])  # every tile of a row as tall as the output
        reference = renderer.measure(resize(content, shape), content, style)
        runs = {method: renderer.run(pair, method) for method in METHODS}
        results["pairs"][pair] = {
            "content_image": content_name,
            "style_image": style_name,
            "content_as_output": reference,
            **{method: record for method, (_, record) in runs.items()},
        }
        tiles = [
            tile(content, box, f"content: {content_name}", caption(reference)),
            tile(style, box, f"style: {style_name}", ""),
            *(tile(img, box, f"{m} only" if m != "fusion" else "fusion", caption(r)) for m, (img, r) in runs.items()),
        ]
        strip(tiles, out / f"compare_{pair}.jpg", args.quality)
        lines = [f"**{pair}**: {content_name} + {style_name}", "", HEADER.format("output"), RULE]
        lines.append(row("content image (reference)", reference))
        lines += [row(f"{m} only" if m != "fusion" else "fusion", r) for m, (_, r) in runs.items()]
        tables.append("\n".join(lines))

    if args.sweep_pair != "none":
        pair = args.sweep_pair
        content_name, style_name = PAIRS[pair]
        sweep = [(a2, *renderer.run(pair, "fusion", a2=a2)) for a2 in SWEEP_A2]
        box = (args.size, sweep[0][1].shape[-2])
        global_image, global_record = renderer.run(pair, "global")
        results["sweep"] = {
            "pair": pair,
            "a1": A1,
            "a3": settings.content_weight,
            "runs": [record for _, _, record in sweep] + [global_record],
        }
        tiles = [tile(img, box, f"a2 = {a2:g}", caption(r)) for a2, img, r in sweep]
        tiles.append(tile(global_image, box, "a2 = 0 (global only)", caption(global_record)))
        strip(tiles, out / f"sweep_{pair}.jpg", args.quality)
        a3 = settings.content_weight
        lines = [f"**a2 sweep** on {pair} ({content_name} + {style_name}), a1 = {A1:g}, a3 = {a3:g}", ""]
        lines += [HEADER.format("a2"), RULE]
        lines += [row(f"{a2:g}", r) for a2, _, r in sweep] + [row("0 (global only)", global_record)]
        tables.append("\n".join(lines))

        if args.a1_sweep:
            a1_runs = [(a1, *renderer.run(pair, "global", a1=a1)) for a1 in [A1, *args.a1_sweep]]
            results["a1_sweep"] = {"pair": pair, "a3": settings.content_weight, "runs": [r for *_, r in a1_runs]}
            tiles = [tile(img, box, f"global only, a1 = {a1:g}", caption(r)) for a1, img, r in a1_runs]
            strip(tiles, out / f"sweep_{pair}_global_a1.jpg", args.quality)
            lines = [f"**global only, a1 sweep** on {pair}, a3 = {settings.content_weight:g}", ""]
            lines += [HEADER.format("a1"), RULE] + [row(f"{a1:g}", r) for a1, _, r in a1_runs]
            tables.append("\n".join(lines))

        if args.spread_seeds:
            spread = {m: [renderer.run(pair, m, seed=s)[1] for s in [args.seed, *args.spread_seeds]] for m in METHODS}
            results["spread"] = {"pair": pair, "seeds": [args.seed, *args.spread_seeds], "runs": spread}
            lines = [f"**seed spread** on {pair}: min - max over seeds {[args.seed, *args.spread_seeds]}", ""]
            lines += [HEADER.format("output"), RULE]
            for m, records in spread.items():
                cells = [
                    f"{min(r[k] for r in records):.3f} - {max(r[k] for r in records):.3f}"
                    for k in ("style_swd", "patch_dist", "content_dist", "ssim", "palette_dist")
                ]
                lines.append(f"| {m} | {' | '.join(cells)} | - |")
            tables.append("\n".join(lines))

    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["render_seconds"] = round(sum(r["seconds"] for r in renderer.records.values()), 1)
    (out / "compare_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n\n".join(tables))
    print(
        f"\n{len(renderer.records)} renders took {results['render_seconds']:.0f} s; this run "
        f"{results['wall_seconds']:.0f} s (cached renders are not rendered again); commit {results['commit']}"
    )


if __name__ == "__main__":
    main()
