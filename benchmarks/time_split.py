"""Where a default run's time goes: per pyramid level, the network's forward and backward passes, the nearest-patch
search, the loss terms and the optimiser's step.

Runs ``stylize`` once (the README's pair by default) with every part of an evaluation wrapped in a timer:

- search: ``PatchLoss.match``, the nearest-patch search and the targets it builds (forward pass, no autograd);
- forward: ``Criterion.__call__`` less the search: the VGG pass and the loss terms on its layers;
- backward: the rest of ``Criterion.evaluate``: the gradient through the terms and the network;
- optimiser: ``LBFGS.step``;
- other: the level's set-up (targets, the style's pass, the fast search's projection), reports and the
  untimed remainder.

On a CPU every operation has finished when it returns, so wall-clock timers around Python calls measure it; on a
GPU they would measure the queueing (this script is for CPUs). Prints one row per level and the total.

    PYTHONPATH=. python benchmarks/time_split.py
    PYTHONPATH=. python benchmarks/time_split.py --set final_iterations=40 --no-mixed-precision
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from settings_args import setting_changes  # noqa: E402

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core import criterion as criterion_module  # noqa: E402
from fusion_core import lbfgs as lbfgs_module  # noqa: E402
from fusion_core import losses as losses_module  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


class Timers:
    """Seconds per (level, part), with the level set from outside."""

    def __init__(self) -> None:
        self.level = 0
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.iterations: dict[int, int] = defaultdict(int)

    @contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[self.level][name] += time.perf_counter() - start

    def wrap(self, owner: type, method: str, name: str) -> None:
        """Time every call of ``owner.method`` under ``name``."""
        original = getattr(owner, method)
        timers = self

        def timed(*args, **kwargs):
            with timers.part(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--content", default=str(ROOT / "example_images" / "chelsea.png"))
    parser.add_argument("--style", default=str(ROOT / "example_images" / "starry_night.jpg"))
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="change a Settings field")
    args = parser.parse_args()
    changes: dict[str, object] = {"mixed_precision": args.mixed_precision, **setting_changes(args.set)}
    settings = Settings(**changes)
    vgg = load_vgg(args.weights)
    content, style = load_image(args.content), load_image(args.style)

    timers = Timers()
    timers.wrap(losses_module.PatchLoss, "match", "search")
    timers.wrap(criterion_module.Criterion, "__call__", "forward+search")
    timers.wrap(criterion_module.Criterion, "evaluate", "evaluate")
    timers.wrap(lbfgs_module.LBFGS, "step", "optimiser")
    ended: dict[int, float] = {}
    shapes: dict[int, tuple[int, int]] = {}

    def on_level(level, criterion, canvas) -> None:
        timers.level = level
        shapes[level] = tuple(canvas.shape[-2:])

    def on_progress(progress) -> None:
        timers.iterations[progress.level - 1] = progress.iteration
        ended[progress.level - 1] = time.perf_counter()

    started = time.perf_counter()
    terms = [GlobalStyle(style), LocalStyle(style)]
    stylize(vgg, content, terms, settings, on_progress=on_progress, on_level=on_level)
    total = time.perf_counter() - started
    print(
        f"settings: {settings.levels} levels, iterations {settings.iterations} (last "
        f"{settings.level_iterations(settings.levels - 1)}), size {settings.size}, mixed precision "
        f"{settings.mixed_precision}, match_content {settings.match_content}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| level | canvas | iterations | forward | search | backward | optimiser | other | level s | s / iteration |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    sums: dict[str, float] = defaultdict(float)
    previous_end = started
    for level in sorted(timers.iterations):
        parts = timers.seconds[level]
        search = parts["search"]
        forward = parts["forward+search"] - search
        backward = parts["evaluate"] - parts["forward+search"]
        optimiser = parts["optimiser"]
        level_seconds = ended[level] - previous_end
        other = level_seconds - forward - search - backward - optimiser
        previous_end = ended[level]
        for name, value in (("forward", forward), ("search", search), ("backward", backward)):
            sums[name] += value
        sums["optimiser"] += optimiser
        sums["other"] += other
        iterations = timers.iterations[level]
        print(
            f"| {level + 1} | {shapes[level][1]}x{shapes[level][0]} | {iterations} | {forward:.1f} | {search:.1f} | "
            f"{backward:.1f} | {optimiser:.1f} | {other:.1f} | {level_seconds:.1f} | {level_seconds / iterations:.3f} |"
        )
    print(
        f"| all | | | {sums['forward']:.1f} | {sums['search']:.1f} | {sums['backward']:.1f} | {sums['optimiser']:.1f} "
        f"| {sums['other']:.1f} | {total:.1f} (whole call) | |"
    )


if __name__ == "__main__":
    main()
