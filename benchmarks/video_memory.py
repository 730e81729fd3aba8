"""Peak resident memory of a clip run against its length: the device holds one frame's work at a time, so a longer
clip should cost only its frames' own bytes more (issue 29's target: a 120-frame clip's peak <= a 30-frame clip's +
the 90 extra frames' bytes + 10%).

Writes the synthetic clip of benchmarks/video.py (a pan over a photo with a second picture moving across it) as
folders of PNG frames, then runs the command line on each, temporal mode, in a fresh process, and reads that
process's peak resident set size (Linux: ru_maxrss in KiB). Iterations are few: a run's memory does not depend on
how many there are, only on the sizes.

    PYTHONPATH=. python benchmarks/video_memory.py                      # 30 and 120 frames at 256 px
    PYTHONPATH=. python benchmarks/video_memory.py --frames 30 300 --size 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from video import PAIRS, SHARED, synthetic_clip  # noqa: E402

from fusion_core import load_image  # noqa: E402
from fusion_core.geometry import fit_longest  # noqa: E402
from fusion_core.images import to_pil  # noqa: E402

# runs the CLI in this process and prints its peak resident memory (KiB on Linux) as the last line
PEAK = (
    "import resource, runpy, sys\n"
    "sys.argv = ['fusion_core', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('fusion_core', run_name='__main__')\n"
    "finally:\n"
    "    print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
)


def peak_kib(arguments: list[str]) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK, *arguments], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("peak_kib")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return int(lines[-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--style", default=str(ROOT / "example_images" / "starry_night.jpg"))
    parser.add_argument("--frames", type=int, nargs=2, default=[30, 120], metavar=("SHORT", "LONG"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3, help="per level and per later frame")
    args = parser.parse_args()

    shape = fit_longest(144, 256, args.size)
    clip, _, _ = synthetic_clip(
        load_image(PAIRS / "lake_sunset_boats.jpg"), load_image(ROOT / "example_images" / "chelsea.png"),
        max(args.frames), shape,
    )  # fmt: skip
    frame_bytes = 3 * shape[0] * shape[1]  # as the run holds its frames: 8-bit
    results = {"size": args.size, "shape": list(shape), "frame_bytes": frame_bytes}
    with tempfile.TemporaryDirectory() as folder:
        for count in args.frames:
            frames = Path(folder) / f"in_{count}"
            frames.mkdir()
            for i, frame in enumerate(clip[:count]):
                to_pil(frame).save(frames / f"frame_{i:05d}.png")
            n = args.iterations
            arguments = ["--content", str(frames), "--style", args.style, "--weights", args.weights]
            arguments += ["--out", str(Path(folder) / f"out_{count}"), "--size", str(args.size), "--quiet"]
            arguments += ["--iters", str(n), "--final-iters", str(n), "--later-iters", str(n)]
            results[f"peak_mib_{count}"] = peak_kib(arguments) / 1024
            print(f"{count} frames: peak {results[f'peak_mib_{count}']:.0f} MiB", flush=True)
    short, long = args.frames
    allowed = results[f"peak_mib_{short}"] * 1.1 + (long - short) * frame_bytes / 2**20
    results["allowed_mib"] = allowed
    results["met"] = results[f"peak_mib_{long}"] <= allowed
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
