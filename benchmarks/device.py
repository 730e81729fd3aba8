"""Speed and memory on whatever device is present (CUDA, Apple MPS or the CPU), as one JSON line.

Times, on the device ``--device`` picks (default: the fastest present):
- floor_s:  one evaluation + backward pass of the global and content terms (the VGG floor of an iteration);
- exact_s:  one exact nearest-patch search (every style patch) on relu3_1, content and style at that size
            (timed once, no warm-up);
- fast_s:   one full fast search (projected candidates re-ranked exactly), and fast_propagate_s one propagation
            round, the search between two full ones;
each at 512 and 1024 px (``--sizes``), the median of ``--repeats`` after a warm-up, with the device
synchronised around every timing. Then the whole default run at 512 px (``Settings()``: 3 levels x 100
iterations, fast matcher, mixed precision where the device has it): run_s, and peak_mb, the peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident memory on a CPU, the driver's
allocation after the run on MPS).

    PYTHONPATH=. python benchmarks/device.py                                  # this machine
    PYTHONPATH=. python benchmarks/device.py --weights models/vgg19.safetensors --device cuda

The trained VGG16 of ../shared is the default network where it exists; give ``--weights`` elsewhere (any VGG16 or
VGG19 file, or "vgg19" to download torchvision's). The images are the repository's example images.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg, save_image  # noqa: E402
from fusion_core.geometry import fit_longest, style_shape  # noqa: E402
from fusion_core.images import resize  # noqa: E402
from fusion_core.matching import FULL_SEARCH_EVERY, MATCHERS  # noqa: E402
from fusion_core.precision import best_device, mixed_dtype  # noqa: E402
from fusion_core.stylize import stylize  # noqa: E402
from fusion_core.targets import build_criterion  # noqa: E402

SHARED_VGG16 = ROOT.parent / "shared" / "models" / "vgg16_hed_caffe_fp16.safetensors"
CONTENT = ROOT / "example_images" / "chelsea.png"
STYLE = ROOT / "example_images" / "starry_night.jpg"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(device: torch.device, work: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Median wall time of ``work`` over ``repeats`` runs, after one warm-up run (kernel selection, caches)."""
    if warm_up:
        work()
    found = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        found.append(time.perf_counter() - start)
    return statistics.median(found)


def floor_seconds(vgg, content, style, size: int, repeats: int) -> float:
    shape = fit_longest(content.shape[-2], content.shape[-1], size)
    criterion = build_criterion(vgg, content, [GlobalStyle(style)], Settings(size=size, levels=1), shape)
    image = resize(content, shape).clone().requires_grad_(True)

    def evaluate():
        image.grad = None
        criterion(image, rematch=False)["total"].backward()

    return seconds(vgg.device, evaluate, repeats)


def search_seconds(vgg, content, style, size: int, repeats: int, exact: bool) -> dict[str, float]:
    shape = fit_longest(content.shape[-2], content.shape[-1], size)
    with torch.no_grad():
        query = vgg(resize(content, shape), ["relu3_1"])["relu3_1"]
        bank = vgg(resize(style, style_shape(tuple(style.shape[-2:]), shape)), ["relu3_1"])["relu3_1"]
    found = {}
    fast = MATCHERS["fast"](bank, 3, 1, None)
    previous = fast(query, None)  # the first call is a full search
    found["fast_s"] = seconds(vgg.device, lambda: fast.full_search(query, previous), repeats)
    # between two full searches, FULL_SEARCH_EVERY - 1 rounds of propagation
    found["fast_propagate_s"] = seconds(vgg.device, lambda: fast.propagate(query, previous), repeats)
    if exact:
        search = MATCHERS["exact"](bank, 3, 1, None)
        # long enough that a warm-up would only double the wait (minutes at 1024 px on a CPU)
        found["exact_s"] = seconds(vgg.device, lambda: search(query, None), 1, warm_up=False)
    return found


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED_VGG16) if SHARED_VGG16.exists() else "vgg19")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the fastest present)")
    parser.add_argument("--sizes", default="512,1024", help="sizes of the floor and search timings, px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-exact-above", type=int, default=None, help="skip the exact search above this size")
    parser.add_argument("--run-size", type=int, default=512, help="size of the whole default run (0: skip it)")
    parser.add_argument("--save", default=None, help="write the whole run's image here (to look at it)")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else best_device()
    vgg = load_vgg(args.weights).to(device)
    content, style = load_image(CONTENT).to(device), load_image(STYLE).to(device)
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "network": Path(args.weights).name,
        "mixed_dtype": str(mixed_dtype(device)),
        "full_search_every": FULL_SEARCH_EVERY,
    }
    for size in (int(s) for s in args.sizes.split(",")):
        exact = args.no_exact_above is None or size <= args.no_exact_above
        timings = {"floor_s": floor_seconds(vgg, content, style, size, args.repeats)}
        timings.update(search_seconds(vgg, content, style, size, args.repeats, exact))
        result[str(size)] = {key: round(value, 4) for key, value in timings.items()}
        print(f"{size} px: {result[str(size)]}", file=sys.stderr, flush=True)
    if args.run_size:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        image = stylize(vgg, content, [GlobalStyle(style), LocalStyle(style)], Settings(size=args.run_size))
        synchronize(device)
        result["run_s"] = round(time.perf_counter() - start, 2)
        result["run_size"] = args.run_size
        if args.save:
            save_image(image.cpu(), args.save)
    result["peak_mb"] = round(peak_mb(device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
