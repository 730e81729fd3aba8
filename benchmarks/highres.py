"""Peak memory and seconds per iteration at print sizes, tiled (tiling.py) and whole where it fits.

Each case runs in its own process (so its peak resident memory is its own): one pyramid level at ``size`` px,
content (grace_hopper.jpg) and style (starry_night.jpg) both enlarged to that size, the default settings otherwise
(fast matcher, L-BFGS; 100 iterations asked, so the L-BFGS history is allocated in full), stopped after
``--iterations`` iterations. The fast search runs a full search (quadratic in the size, the same tiled or not)
at every third match and a propagation between; the matches are seeded as a full search leaves them, so the
first two iterations are propagations and the third a full search. Reported per case: the plan (tiles, split, L-BFGS
history), the level's set-up (style and content through the network, the search's projection), ``iteration_s``
(the mean of the two propagation iterations: the network, the losses, the optimiser step) and its microseconds
per canvas pixel, with three iterations ``full_search_s`` (the third's extra) and ``schedule_s`` (the mean of all
three: what an iteration costs on average), the process's peak resident memory (torch itself included), and what
the level's plan was given and counted: ``free_mb`` (the memory free, as the plan saw it) and ``estimate_mb``
(``memory.plan_bytes`` for the plan it chose).

    PYTHONPATH=. python benchmarks/highres.py                     # the table in BENCHMARKS.md
    PYTHONPATH=. python benchmarks/highres.py --cases 2048:auto=3:history=5 2048:whole

A case is SIZE:whole (evaluated whole), SIZE:tile=PX (tiles of at most PX px) or SIZE:auto=GB (the run with
``Settings(max_memory=GB)``, the CLI's ``--max-memory GB``: what ``memory.plan_level`` picks for a process that may
hold GB in all, torch itself included; SIZE:auto: ``--memory-gb``), each with an optional :history=N
(default 20), :split=LAYER (the deep layers whole after that pooling layer; none: every layer in tiles;
default: the plan's choice) and :float32 (mixed precision off: the network in float32 on a CPU with bfloat16
instructions too, as on one without them).
4096 px cases run two iterations (a full search there takes about 16x the 2048 px one).

Time ratios between cases are measured as pairs of separate processes run in turn (``farm-bench --vs``, the command in
BENCHMARKS.md). Two cases in one process, in threads taking turns, slowed the untiled 1024 px case by ~45% and the
tiled one by ~10% against their own processes (threads allocate from glibc's per-thread arenas, not the main heap;
the cause was not measured further), so in-process pairs are not used.

``--device cuda`` runs the cases on a GPU: the peak is then what torch allocated there
(``torch.cuda.max_memory_allocated``), and an auto=GB case caps the process at GB
(``torch.cuda.set_per_process_memory_fraction``), as a card of that size would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_WEIGHTS = ROOT.parent / "shared" / "models" / "vgg16_hed_caffe_fp16.safetensors"
CONTENT = ROOT / "example_images" / "grace_hopper.jpg"
STYLE = ROOT / "example_images" / "starry_night.jpg"
DEFAULT_CASES = [
    "1024:whole:history=5",
    "2048:auto=3:history=5",
    "2048:whole:history=5",
    "2048:tile=1280:split=none:history=5",
    "4096:auto=6:history=3",
]


def run_case(
    case: str,
    weights: str,
    iterations: int,
    memory_gb: float | None,
    device_name: str = "cpu",
) -> dict:
    """One case, in this process."""
    import torch

    from fusion_core import Cancelled, GlobalStyle, LocalStyle, Settings, load_image, load_vgg
    from fusion_core import memory as memory_module
    from fusion_core.allocator import freed_memory_returned
    from fusion_core.images import resize
    from fusion_core.losses import PatchLoss
    from fusion_core.stylize import stylize

    size_text, mode, *options = case.split(":")
    size = int(size_text)
    history, split, mixed = 20, None, True
    for option in options:
        name, _, value = option.partition("=")
        if name == "float32" and not value:  # mixed precision off: float32 even where bfloat16 is native
            mixed = False
        elif name == "history":
            history = int(value)
        elif name == "split":
            split = value
        else:
            raise SystemExit(f"unknown option {option!r} in case {case!r}")
    if split is not None:  # this split (a pooling layer) or none: every layer in tiles
        memory_module.split_candidates = lambda vgg, layers: [] if split == "none" else [split]
    tile, budget = 0, 0.0
    if mode.startswith("tile="):
        tile = int(mode[5:])
    elif mode == "whole":
        memory_module.available_bytes = lambda device, max_memory=0.0: 1 << 50  # never tiled
    elif mode == "auto" or mode.startswith("auto="):
        memory_gb = float(mode[5:]) if mode.startswith("auto=") else memory_gb
        budget = memory_gb or 0.0  # Settings.max_memory: all the process may hold, torch itself counted on a CPU
    else:
        raise SystemExit(f"unknown mode {mode!r} in case {case!r}")
    import fusion_core.stylize as stylize_module

    planned = []  # the levels' plans, as stylize receives them
    plan: dict = {}  # the last level's: what it was planned for, the search, the progress's tiles and history
    plan_level = memory_module.plan_level

    def recording_plan_level(vgg, shape, styles, settings):
        available = memory_module.available_bytes(vgg.device, settings.max_memory)
        planned.append(plan_level(vgg, shape, styles, settings, available))
        plan["free_mb"] = None if available is None or available >= 1 << 49 else round(available / 2**20)
        plan["estimate_mb"] = round(memory_module.plan_bytes(vgg, shape, styles, settings, planned[-1]) / 2**20)
        return planned[-1]

    stylize_module.plan_level = recording_plan_level
    device = torch.device(device_name)
    if device.type == "cuda" and budget > 0:
        # A card of that size: the allocator refuses more, so cuDNN takes algorithms whose workspace fits (on a
        # large card it takes gigabytes of workspace because they are free), and a plan that did not fit fails.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gb * 2**30 / total), device.index or 0)
    vgg = load_vgg(weights).to(device)
    content, style = load_image(CONTENT).to(device), load_image(STYLE).to(device)
    content = resize(content, _fit(content.shape[-2:], size))
    style = resize(style, _fit(style.shape[-2:], size))
    settings = Settings(
        size=size, levels=1, iterations=100, tile=tile, history_size=history, mixed_precision=mixed, max_memory=budget
    )
    marks: list[float] = []

    def on_level(level, criterion, canvas) -> None:
        # The fast search runs a full search (quadratic in the size, the same tiled or not) at every third match
        # and a propagation between. Seed the matches as a full search leaves them, so the timed iterations are
        # propagations; the full search is timed on its own below. A real nearest-patch field is coherent (its
        # neighbours match neighbours), which the propagation's memory reads depend on: the seed maps each patch
        # to the style patch at the same relative place, and the candidate pool to its neighbours.
        for _, _, module in criterion.terms:
            if isinstance(module, PatchLoss):
                search = module.searcher()
                s_rows, s_cols = search.grid
                q_rows, q_cols = canvas.shape[-2] // 4 - 2, canvas.shape[-1] // 4 - 2
                rows = torch.arange(q_rows)[:, None] * s_rows // q_rows
                cols = torch.arange(q_cols)[None, :] * s_cols // q_cols
                module.set_matches((rows * s_cols + cols).flatten().to(device))
                pool = [
                    (rows + dy).clamp(0, s_rows - 1) * s_cols + (cols + dx).clamp(0, s_cols - 1)
                    for dy in (-2, 2)
                    for dx in (-2, 0, 2)
                    if (dy, dx) != (0, 0)
                ]
                pool += [(rows * s_cols + (cols + dx).clamp(0, s_cols - 1)) for dx in (-2, 2)]
                search.pool = torch.stack([p.flatten() for p in pool], 1).to(device)
                search.matches = 1
                plan["search"], plan["canvas"] = search, tuple(canvas.shape[-2:])
        marks.append(_clock(device))

    def on_progress(p) -> None:
        marks.append(_clock(device))
        plan.update(tiles=p.tiles, history=p.history)

    def should_stop() -> bool:
        return len(marks) > iterations

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = _clock(device)
    # as the CLI does: freed blocks returned around levels in tiles, and around the whole run with a budget
    with freed_memory_returned(device, enabled=budget > 0), contextlib.suppress(Cancelled):  # after ``iterations``
        stylize(
            vgg,
            content,
            [GlobalStyle(style), LocalStyle(style)],
            settings,
            on_progress=on_progress,
            on_level=on_level,
            should_stop=should_stop,
            tiled_level=freed_memory_returned,
        )
    if device.type == "cuda":  # the GPU's own peak: what torch allocated there (the host's is not the limit)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    canvas = plan["canvas"]
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    propagation = sum(steps[:2]) / len(steps[:2])  # the seeded search's first two matches are propagations
    result = {
        "case": case,
        "canvas": f"{canvas[1]}x{canvas[0]}",
        "tiles": plan["tiles"],
        "history": plan["history"],
        "split": planned[-1].split,
        "setup_s": round(marks[0] - start, 1),
        "iteration_s": round(propagation, 2),
        "us_per_px": round(propagation / (canvas[0] * canvas[1]) * 1e6, 2),
        "peak_mb": round(peak),
        "free_mb": plan["free_mb"],
        "estimate_mb": plan["estimate_mb"],
    }
    if len(steps) >= 3:  # the third match is a full search: the schedule's average, and the search's own cost
        result["full_search_s"] = round(steps[2] - propagation, 1)
        result["schedule_s"] = round(sum(steps[:3]) / 3, 2)
    return result


def _clock(device) -> float:
    """Wall time, after the device's queued work (a GPU runs ahead of the host)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _fit(shape, longest: int) -> tuple[int, int]:
    h, w = int(shape[0]), int(shape[1])
    scale = longest / max(h, w)
    return round(h * scale), round(w * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--weights", default=str(SHARED_WEIGHTS))
    parser.add_argument("--iterations", type=int, default=3, help="iterations timed per case (2 at 4096 px)")
    parser.add_argument("--memory-gb", type=float, default=None, help="memory the auto cases plan for")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak: resident memory, or torch's on the GPU)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.weights, args.iterations, args.memory_gb, args.device)), flush=True)
        return
    for case in args.cases:
        command = [sys.executable, __file__, "--one", case, "--weights", args.weights, "--device", args.device]
        command += ["--iterations", str(min(2, args.iterations) if case.startswith("4096") else args.iterations)]
        if args.memory_gb is not None:
            command += ["--memory-gb", str(args.memory_gb)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(json.dumps({"case": case, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
