"""What the default Gram layers cost per iteration, against the paper's, in one run.

relu1_1..relu5_1 (the defaults) need the network up to conv5_1; the paper's relu1_2, relu2_2, relu3_3, relu4_2 stop
at conv4_2. Times one L-BFGS iteration of the default fusion path at 512 px (astronaut.png and the centre square of
starry_night.jpg, as bench.py) with each layer set, in interleaved rounds, and prints the medians.

    PYTHONPATH=. python benchmarks/gram_layers_cost.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SHARED, seconds_per_iteration  # noqa: E402

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core.config import PAPER_GLOBAL_LAYERS  # noqa: E402
from fusion_core.images import resize  # noqa: E402


def centre_square(image):
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[..., top : top + side, left : left + side]


def main(rounds: int = 2, intervals: int = 6) -> None:
    vgg = load_vgg(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors")
    content = resize(centre_square(load_image(SHARED / "images" / "astronaut.png")), (512, 512))
    style = centre_square(load_image(SHARED / "images" / "starry_night.jpg"))
    terms = [GlobalStyle(style), LocalStyle(style)]
    cases = {
        "default layers (relu1_1..relu5_1)": Settings(size=512),
        "paper layers (relu1_2, relu2_2, relu3_3, relu4_2)": Settings(size=512, global_layers=PAPER_GLOBAL_LAYERS),
    }
    found: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(1, rounds + 1):
        for name, settings in cases.items():
            found[name].append(seconds_per_iteration(vgg, content, terms, settings, intervals))
        print(f"round {round_}/{rounds}: " + "  ".join(f"{k} {v[-1]:.2f} s" for k, v in found.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in found.items()}
    default, paper = medians.values()
    print("medians: " + "  ".join(f"{k} {v:.2f} s" for k, v in medians.items()) + f"  ratio {default / paper:.2f}")


if __name__ == "__main__":
    main()
