"""Seconds per iteration of the fusion path in two checkouts of this repository, as whole processes taking turns.

A refactor's cost: each turn runs one process per checkout (the order alternating), each process one level of
--size px for --iterations L-BFGS iterations of the given settings, timed from ``stylize``'s progress reports after
the first --skip (the level's set-up and the first searches left out). The ratio of each turn's pair is printed,
then their median and geometric mean: the CPU's drift over minutes moves both of a pair alike.

    git worktree add /tmp/before <commit>
    PYTHONPATH=. python benchmarks/checkout_ab.py /tmp/before . --turns 8 \\
        --set match_content=0 --set match_metric=correlation --set content_layer=relu3_1

--set NAME=VALUE (JSON, or a string) changes a ``Settings`` field; give both checkouts' defaults where they differ,
so the comparison is of the code, not of the settings. The inputs are bench.py's: astronaut.png and the centre
square of starry_night.jpg, the global term at a1 = 20 and the local one at a2 = 1e-4.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from settings_args import setting_changes  # noqa: E402

SHARED = ROOT.parent / "shared"


def child(tree: str, changes: dict, size: int, iterations: int, skip: int, weights: str) -> None:
    sys.path.insert(0, tree)
    from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg
    from fusion_core.stylize import stylize

    vgg = load_vgg(weights)
    content = load_image(SHARED / "images" / "astronaut.png")
    style = load_image(SHARED / "images" / "starry_night.jpg")
    h, w = style.shape[-2:]
    side = min(h, w)
    style = style[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    # a field the checkout does not have yet is left out: it behaved then as the value it is given for the other
    fields = {"size": size, "levels": 1, "iterations": iterations}
    fields.update({k: v for k, v in changes.items() if k in Settings.__dataclass_fields__})
    if "final_iterations" in Settings.__dataclass_fields__:
        fields["final_iterations"] = 0  # the one level is the last: all its iterations, not a shorter last level
    stamps: list[float] = []
    stylize(
        vgg,
        content,
        [GlobalStyle(style, weight=20.0), LocalStyle(style, weight=1e-4)],
        Settings(**fields),
        on_progress=lambda _: stamps.append(time.perf_counter()),
    )
    steps = [b - a for a, b in zip(stamps[skip:-1], stamps[skip + 1 :], strict=True)]
    print(json.dumps({"seconds": statistics.fmean(steps), "n": len(steps)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="the first checkout's root (e.g. a git worktree of the older commit)")
    parser.add_argument("after", help="the second checkout's root")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=14)
    parser.add_argument("--skip", type=int, default=2, help="progress reports left out at the start")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    changes = setting_changes(args.set)
    if args.child:
        child(args.child, changes, args.size, args.iterations, args.skip, args.weights)
        return
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    ratios = []
    for turn in range(args.turns):
        seconds = {}
        for name in ("before", "after") if turn % 2 == 0 else ("after", "before"):
            command = [sys.executable, __file__, args.before, args.after, "--child", trees[name]]
            command += [f"--{k}={v}" for k, v in (("size", args.size), ("iterations", args.iterations))]
            command += [f"--skip={args.skip}", f"--weights={args.weights}", *(f"--set={s}" for s in args.set)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=trees[name]).stdout
            seconds[name] = json.loads(out.strip().splitlines()[-1])["seconds"]
        ratios.append(seconds["after"] / seconds["before"])
        print(f"turn {turn + 1}: before {seconds['before']:.3f} s, after {seconds['after']:.3f} s, {ratios[-1]:.3f}x")
    geometric = math.exp(statistics.fmean(math.log(r) for r in ratios))
    print(json.dumps({"median_ratio": round(statistics.median(ratios), 3), "geometric_mean": round(geometric, 3)}))


if __name__ == "__main__":
    main()
