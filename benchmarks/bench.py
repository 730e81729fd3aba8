"""Speed, memory and quality of the default fusion path against the naive local loss, in one run.

Measures on this machine, with the same inputs and the trained VGG16. The inputs are the issue's setting,
"512 px content and style": content astronaut.png (512 x 512) and the centre square of starry_night.jpg, so at
512 px both relu3_1 maps are 128 x 128 (~16k x 16k patches, ~1.2 TFLOP per exact search). Any other pair can
be given (--content, --style, --no-square); non-square images have fewer style patches per output pixel, so
the search is a smaller share of an iteration.
- floor_s:  one L-BFGS iteration with the global and content losses only (the VGG forward+backward floor);
- naive_s:  one iteration with the local loss done the naive way: exact search over all style patches at every
            loss evaluation (matcher="exact", rematch_every=1);
- fusion_s: one iteration of the default fusion path (Settings() defaults), averaged over whole re-matching
            periods so the searches are amortised as they are in a real run;
  all three at the default precision, so their ratios measure the search: on a CPU with bfloat16 instructions
  that is the bfloat16 VGG pass (precision.py), and fusion_float32_s, the default path in float32 throughout,
  is printed too;
- peak_mb:  peak resident memory of a process running default fusion iterations at 1024 px content and style,
            until the L-BFGS history is full;
- loss_gap: both paths run from the same seed for the same iterations at --gap-size (256 px, 3 levels); each
            final image is scored by the same float32 criterion with exact matching; (default - naive) / naive.
            The naive path here is the paper's method as written: exact search and float32 throughout, so the
            gap covers everything the default changes (search and precision).

Iteration times come from the progress reports of ``stylize`` at a single level of --size px, so the per-level
set-up (style features, the fast search's projection) is left out; it is timed and printed separately. Other
programs may share the CPU, so the three paths are measured in interleaved rounds and the medians reported:
their ratios hold within the run even when the absolute times drift.

    PYTHONPATH=. python benchmarks/bench.py                  # 512 px, the run behind BENCHMARKS.md
    PYTHONPATH=. python benchmarks/bench.py --size 256 --repeats 1 --gap-iters 20   # a quick look
    PYTHONPATH=. python benchmarks/bench.py --timings-only --no-square \
        --content ../shared/images/chelsea.png                 # the three timings for a landscape pair

The last line printed is one JSON object: size, floor_s, naive_s, fusion_s, peak_mb, loss_gap.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core.functional import patches, positions_last  # noqa: E402
from fusion_core.geometry import fit_longest, level_shapes  # noqa: E402
from fusion_core.images import resize, to_pil  # noqa: E402
from fusion_core.matching import (  # noqa: E402
    FULL_SEARCH_EVERY,
    ProjectedSearch,
    _gather_patches,
    nearest_patches,
)
from fusion_core.precision import mixed_dtype  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402
from fusion_core.targets import build_criterion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NAIVE = {"matcher": "exact", "rematch_every": 1}
FLOAT32 = {"mixed_precision": False}


def seconds_per_iteration(vgg, content, styles, settings: Settings, intervals: int) -> float:
    """Mean time between progress reports 1 and 1 + intervals of a one-level run (set-up excluded)."""
    stamps: list[float] = []
    # final_iterations=0: the one level is the last, which would otherwise run the defaults' final_iterations
    run = replace(settings, levels=1, iterations=intervals + 1, final_iterations=0)
    stylize(vgg, content, styles, run, on_progress=lambda p: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / intervals


def timings(vgg, content, style, size: int, repeats: int) -> dict[str, float]:
    default = Settings(size=size)
    # Whole periods of the default's schedule: a search every rematch_every iterations, and of those
    # searches one full candidate search in FULL_SEARCH_EVERY (propagation between), so each costs its share.
    period = default.rematch_every * (FULL_SEARCH_EVERY if default.matcher == "fast" else 1)
    periods = max(1, -(-6 // period))  # at least 6 iterations
    cases = {
        "floor_s": ([GlobalStyle(style)], default, 3),
        "naive_s": ([GlobalStyle(style), LocalStyle(style)], replace(default, **NAIVE), 2),
        "fusion_s": ([GlobalStyle(style), LocalStyle(style)], default, periods * period),
    }
    if mixed_dtype(vgg.device) is not None:  # what the 16-bit pass buys: the same path in float32
        cases["fusion_float32_s"] = ([GlobalStyle(style), LocalStyle(style)], replace(default, **FLOAT32), period)
    found: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(1, repeats + 1):
        for name, (styles, settings, intervals) in cases.items():
            found[name].append(seconds_per_iteration(vgg, content, styles, settings, intervals))
        print(f"round {round_}/{repeats}: " + "  ".join(f"{k} {v[-1]:.2f}" for k, v in found.items()), flush=True)
    return {name: statistics.median(values) for name, values in found.items()}


def fit_seconds(vgg, content, style, size: int) -> float:
    """Time to fit the fast search's projection for the last level (once per level in a run)."""
    shape = level_shapes(content.shape[-2], content.shape[-1], size, 1)[-1]
    style_shape = fit_longest(style.shape[-2], style.shape[-1], max(shape))
    with torch.no_grad():
        features = vgg(resize(style, style_shape), ["relu3_1"])
    start = time.perf_counter()
    ProjectedSearch(features["relu3_1"])
    return time.perf_counter() - start


def search_comparison(vgg, content, style, size: int, repeats: int) -> dict[str, float]:
    """The searches alone at the last level: exact vs fast time and how good the fast matches are.

    The query is the content image's relu3_1 map (the optimised image's is closer to the style, which
    only makes the fast search's candidates better).
    """
    shape = level_shapes(content.shape[-2], content.shape[-1], size, 1)[-1]
    style_shape = fit_longest(style.shape[-2], style.shape[-1], max(shape))
    with torch.no_grad():
        query = vgg(resize(content, shape), ["relu3_1"])["relu3_1"]
        target = vgg(resize(style, style_shape), ["relu3_1"])["relu3_1"]
    start = time.perf_counter()
    search = ProjectedSearch(target)
    fit = time.perf_counter() - start
    times: dict[str, list[float]] = {"exact": [], "fast": []}
    for _ in range(repeats):
        for name, run in (("exact", lambda: nearest_patches(query, target)), ("fast", lambda: search(query))):
            start = time.perf_counter()
            found = run()
            times[name].append(time.perf_counter() - start)
            if name == "exact":
                exact = found
            else:
                fast = found
    scores = {}
    for name, index in (("exact", exact), ("fast", fast)):
        style_patches = _gather_patches(positions_last(target), tuple(target.shape[-2:]), index, 3, 1)
        scores[name] = (patches(query, 3, 1) * style_patches).sum(1) / style_patches.norm(dim=1).clamp_min(1e-8)
    ratio = scores["fast"] / scores["exact"]
    return {
        "fit_s": fit,
        "exact_search_s": statistics.median(times["exact"]),
        "fast_search_s": statistics.median(times["fast"]),
        "same_patch": float((fast == exact).float().mean()),
        "score_ratio_mean": float(ratio.mean()),
        "score_ratio_p01": float(ratio.quantile(0.01)),
    }


def loss_gap(vgg, content, style, size: int, iterations: int, seed: int) -> tuple[float, dict, Image.Image]:
    """Final losses (exact matching) of the naive and the default path after the same iterations."""
    styles = [GlobalStyle(style), LocalStyle(style)]
    default = Settings(size=size, iterations=iterations, seed=seed)
    shape = level_shapes(content.shape[-2], content.shape[-1], size, default.levels)[-1]
    naive = replace(default, **NAIVE, **FLOAT32)
    judge = build_criterion(vgg, content, styles, naive, shape)
    results, images = {}, {}
    for name, settings in (("naive", naive), ("default", default)):
        start = time.perf_counter()
        images[name] = stylize(vgg, content, styles, settings)
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            losses = {k: float(v) for k, v in judge(images[name], rematch=True).items()}
        results[name] = {"seconds": round(elapsed, 1), **{k: round(v, 4) for k, v in losses.items()}}
        print(f"{name:>7} at {size} px: {elapsed:.0f} s, exact-matching losses {results[name]}", flush=True)
    gap = (results["default"]["total"] - results["naive"]["total"]) / results["naive"]["total"]
    return gap, results, side_by_side(images["naive"], images["default"])


def side_by_side(naive: torch.Tensor, default: torch.Tensor) -> Image.Image:
    left, right = to_pil(naive), to_pil(default)
    label = 18
    canvas = Image.new("RGB", (left.width + right.width + 4, left.height + label), "white")
    canvas.paste(left, (0, label))
    canvas.paste(right, (left.width + 4, label))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), "naive: exact search, every evaluation", fill="black")
    settings = Settings()
    how = "fast search + propagation" if settings.matcher == "fast" else f"{settings.matcher} search"
    if settings.rematch_every > 1:
        how += f", every {settings.rematch_every} iterations"
    draw.text((left.width + 8, 3), f"default: {how}", fill="black")
    return canvas


def centre_square(image: torch.Tensor) -> torch.Tensor:
    side = min(image.shape[-2:])
    top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
    return image[..., top : top + side, left : left + side].contiguous()


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    content, style = load_image(args.content), load_image(args.style)
    if args.square:
        content, style = centre_square(content), centre_square(style)
    return content, style


def peak_mb(args: argparse.Namespace) -> float:
    """Peak resident memory of a child process running default fusion iterations at 1024 px."""
    command = [
        sys.executable,
        __file__,
        "--peak-child",
        "--weights",
        args.weights,
        "--content",
        args.content,
        "--style",
        args.style,
        "--square" if args.square else "--no-square",
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def peak_child(args: argparse.Namespace) -> None:
    vgg = load_vgg(args.weights)
    content, style = inputs(args)
    # One level at 1024 px; the style is resized so its longest side is 1024 px too. history_size + 1
    # iterations, so the L-BFGS history (2 image-sized vectors per iteration) is full, as in a real run.
    default = Settings()
    settings = Settings(size=1024, levels=1, iterations=default.history_size + 1, final_iterations=0)
    stylize(vgg, content, [GlobalStyle(style), LocalStyle(style)], settings)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(json.dumps({"peak_mb": round(peak_kb / 1024, 1)}))


def cpu_pressure() -> str:
    """The kernel's CPU pressure (share of time some task waited for a CPU), where Linux reports it."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "not available"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, choices=[256, 512])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of floor/naive/fusion timings")
    parser.add_argument("--gap-size", type=int, default=256)
    parser.add_argument("--gap-iters", type=int, default=100, help="iterations per level of the loss_gap runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--content", default=str(SHARED / "images" / "astronaut.png"))
    parser.add_argument("--style", default=str(SHARED / "images" / "starry_night.jpg"))
    parser.add_argument(
        "--image",
        default=str(ROOT / "docs" / "bench_naive_vs_fast.jpg"),
        help="where to write the naive | default side-by-side ('' to skip)",
    )
    parser.add_argument(
        "--square",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="crop content and style to their centre squares (default: yes)",
    )
    parser.add_argument("--timings-only", action="store_true", help="only floor_s, naive_s and fusion_s")
    parser.add_argument("--peak-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--search-only", action="store_true", help="only compare the exact and the fast search at --size"
    )
    args = parser.parse_args()
    if args.peak_child:
        peak_child(args)
        return
    if args.search_only:
        vgg = load_vgg(args.weights)
        found = search_comparison(vgg, *inputs(args), args.size, args.repeats)
        print(json.dumps({k: round(v, 5) for k, v in found.items()}))
        return

    torch.manual_seed(args.seed)
    default = Settings()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )
    half = mixed_dtype(torch.device("cpu"), default.mixed_precision)
    print(
        f"default path: matcher={default.matcher!r}, rematch_every={default.rematch_every}, "
        f"VGG pass and search in {half or torch.float32}"
    )
    print(f"CPU pressure at the start: {cpu_pressure()}")
    print(f"inputs: {Path(args.content).name}, {Path(args.style).name}{', centre squares' if args.square else ''}")
    vgg = load_vgg(args.weights)
    content, style = inputs(args)

    times = timings(vgg, content, style, args.size, args.repeats)
    if args.timings_only:
        print(json.dumps({"size": args.size, **{k: round(v, 3) for k, v in times.items()}}))
        return
    fit = fit_seconds(vgg, content, style, args.size)
    print(f"fast search projection fit at {args.size} px: {fit:.2f} s once per level")
    peak = peak_mb(args)
    print(f"peak resident memory, default fusion at 1024/1024 px: {peak:.0f} MB")
    gap, losses, picture = loss_gap(vgg, content, style, args.gap_size, args.gap_iters, args.seed)
    if args.image:
        picture.save(args.image, quality=85)
        print(f"wrote {args.image}")

    print(f"CPU pressure at the end: {cpu_pressure()}")
    result = {
        "size": args.size,
        **{k: round(times[k], 3) for k in ("floor_s", "naive_s", "fusion_s")},
        "peak_mb": round(peak, 1),
        "loss_gap": round(gap, 4),
    }
    floor, naive, fusion = times["floor_s"], times["naive_s"], times["fusion_s"]
    print(
        f"fusion / floor = {fusion / floor:.2f} (target <= 1.5); naive / fusion = {naive / fusion:.2f} "
        f"(target >= 4); loss_gap = {gap:+.2%} (target <= 2%); peak = {peak:.0f} MB (target <= 3000)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
