"""One VGG forward + backward pass (the floor of every iteration) in three set-ups, timed in interleaved rounds.

- float32, channels-first: the layout torch uses by default (the code before channels-last);
- float32, channels-last: the VGG pass's layout on CPU and CUDA (``precision.memory_format``);
- bfloat16, channels-last: the default on a CPU with bfloat16 instructions (``precision.mixed_dtype``).

The pass runs to relu4_2 with the default loss layers returned, as in a run of the default settings, on a
random image of the size of the last level of the README's main command (512 x 341). Medians over the rounds.

    PYTHONPATH=. python benchmarks/vgg_pass.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_core import load_vgg  # noqa: E402
from fusion_core import vgg as vgg_module  # noqa: E402
from fusion_core.precision import GradientScale, autocast, native_bfloat16  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
LAYERS = ("relu1_2", "relu2_2", "relu3_1", "relu3_3", "relu4_2")


def pass_seconds(vgg, image: torch.Tensor, dtype: torch.dtype | None, channels_last: bool) -> float:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    vgg_module.memory_format = lambda device: layout
    scale = GradientScale(enabled=dtype is not None)
    x = image.clone().requires_grad_(True)
    start = time.perf_counter()
    with autocast(x.device, dtype):
        features = [scale.for_losses(value) for value in vgg(scale.unscale_at(x), LAYERS).values()]
    # sum() / numel rather than mean(): mean's gradient comes back channels-first (see functional.content_loss)
    sum(f.square().sum() / f.numel() for f in features).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--height", type=int, default=341)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    vgg = load_vgg(args.weights)
    image = torch.rand(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    setups = {
        "float32, channels-first": (None, False),
        "float32, channels-last": (None, True),
        "bfloat16, channels-last": (torch.bfloat16, True),
    }
    threads = torch.get_num_threads()
    print(f"{args.width} x {args.height} px, {threads} threads, bfloat16 instructions: {native_bfloat16()}")
    found: dict[str, list[float]] = {name: [] for name in setups}
    for setup in setups.values():  # warm-up: first calls pick and build the convolution kernels
        pass_seconds(vgg, image, *setup)
    for _ in range(args.rounds):
        for name, setup in setups.items():
            found[name].append(pass_seconds(vgg, image, *setup))
    base = statistics.median(found["float32, channels-first"])
    for name, values in found.items():
        median = statistics.median(values)
        print(f"{name:>24}: {median:.3f} s per forward + backward pass ({base / median:.2f}x channels-first float32)")


if __name__ == "__main__":
    main()
