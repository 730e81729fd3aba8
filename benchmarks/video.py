"""Temporal consistency of stylised clips: independent frames against the temporal mode (fusion_core/video.py).

    PYTHONPATH=. python benchmarks/video.py --frames 30 --size 256                 # the synthetic clip, both modes
    PYTHONPATH=. python benchmarks/video.py --weights-sweep 0 50 200 1000          # temporal weights on it
    PYTHONPATH=. python benchmarks/video.py --frames 120 --modes temporal --there-and-back   # drift, long clip
    PYTHONPATH=. python benchmarks/video.py --frames 120 --modes temporal          # drift on a one-way pan ...
    PYTHONPATH=. python benchmarks/video.py --frames 120 --modes independent --independent-ends   # ... its reference
    PYTHONPATH=. python benchmarks/video.py --write-example example_images/pan_clip.mp4   # the workflows' clip

The synthetic clip has an exact flow and exact occlusions: a camera pan over a photo (the frame is a window moving
by a known sub-pixel step over a larger picture) with a second picture moving across it the other way. Per mode:
the warping error (Lai et al. 2018: the mean over consecutive pairs of the occlusion-masked mean squared difference
between a frame and the previous one warped into it, RGB in 0..1), with the *exact* flow and occlusions here (the
method's own flow is DIS, or RAFT: never the judge), the input clip's own warping error (the floor), per frame the
style SWD, content distance, palette distance and SSIM to the photo (benchmarks/metrics.py) and sharpness (mean
gradient magnitude), their means and the first ten frames' against the last ten's, seconds per frame and the flow's
share of the later frames' time. Frames and a temporal slice (one image row over time) are written to ``--out``
to look at.

Drift (the last ten frames' numbers against the first ten's): on a one-way pan the two ends show different parts of
the picture (the pan moves on, the mover leaves), so their numbers differ without any drift; ``--there-and-back``
turns camera and mover back halfway, so the two ends are the same pictures and any change is drift. On a one-way
clip, ``--independent-ends`` stylises just its first and last ten frames on their own: the clip's own change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics  # noqa: E402

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg  # noqa: E402
from fusion_core.flow import flow_estimator  # noqa: E402
from fusion_core.geometry import fit_longest  # noqa: E402
from fusion_core.images import resize, to_pil  # noqa: E402
from fusion_core.media import ClipWriter, read_clip  # noqa: E402
from fusion_core.temporal import reliability, warp  # noqa: E402
from fusion_core.video import LATER_ITERATIONS, TEMPORAL_WEIGHT, VideoSettings, stylize_frames  # noqa: E402

SHARED = ROOT.parent / "shared"
PAIRS = ROOT / "benchmarks" / "pairs"
ENDS = 10  # frames at each end of a clip whose means are compared (drift)


def synthetic_clip(
    background: torch.Tensor,
    mover: torch.Tensor,
    frames: int,
    shape: tuple[int, int],
    there_and_back: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Frames of ``shape`` panning over ``background`` (0.7 px right, 0.4 px down per frame) with ``mover`` (a
    third of the frame's height) sliding left across them at 2.3 px per frame; for each frame after the first its
    exact backward flow (to the frame before) and where the frame before shows the same point (1) or the mover
    hid or revealed it (0). ``there_and_back``: camera and mover turn back halfway, so frame t and frame
    ``frames - 1 - t`` are the same picture (a long clip whose two ends can be compared for drift)."""
    h, w = shape
    pan, slide = torch.tensor([0.7, 0.4]), torch.tensor([-2.3, 0.0])
    # how many steps along the way each frame is
    steps = [min(t, frames - 1 - t) if there_and_back else t for t in range(frames)]
    reach = max(steps) + 1
    big = resize(background, (h + int(reach * 0.4) + 8, w + int(reach * 0.7) + 8))
    side = h // 3
    patch = resize(mover, (side, side))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    clip, flows, masks = [], [], []
    for t, step in enumerate(steps):
        offset = 2 + step * pan  # the window's top-left corner in the big picture (x, y)
        frame = warp(big, offset.view(1, 2, 1, 1).expand(1, 2, *big.shape[-2:]))[..., :h, :w]
        corner = torch.tensor([w - side - 4, h // 3]) + step * slide  # the mover's top-left corner (x, y)
        inside = _inside(xs, ys, corner, side)
        moved = F.grid_sample(
            patch,
            torch.stack([2 * (xs - corner[0]) / (side - 1) - 1, 2 * (ys - corner[1]) / (side - 1) - 1], -1)[None],
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        frame = torch.where(inside, moved, frame)
        clip.append(frame.clamp(0, 1))
        if t > 0:
            moving = step - steps[t - 1]  # +1 out, -1 back, 0 at the turn
            background = (moving * pan)[:, None, None].expand(2, h, w)
            flow = torch.where(inside, (-moving * slide)[:, None, None], background)[None]
            before_corner = corner - moving * slide
            # where the point was in the frame before, and what the frame before showed there
            bx, by = xs + flow[0, 0], ys + flow[0, 1]
            was_inside = _inside(bx, by, before_corner, side)
            same = inside == was_inside  # mover on mover, background on background
            on_frame = (bx >= 0) & (bx <= w - 1) & (by >= 0) & (by <= h - 1)
            flows.append(flow)
            masks.append((same & on_frame).float()[None, None])
    return clip, flows, masks


def _inside(xs: torch.Tensor, ys: torch.Tensor, corner: torch.Tensor, side: int) -> torch.Tensor:
    return (xs >= corner[0]) & (xs <= corner[0] + side - 1) & (ys >= corner[1]) & (ys <= corner[1] + side - 1)


def farneback_flows(clip: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The judge's flows for a real clip: OpenCV's Farneback (not the method's DIS or RAFT), on the input frames,
    each frame's backward flow and its forward-backward reliability mask (temporal.reliability)."""
    import cv2

    def grey(frame: torch.Tensor):
        return (frame[0].mean(0) * 255).round().to(torch.uint8).numpy()

    def farneback(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        flow = cv2.calcOpticalFlowFarneback(grey(a), grey(b), None, 0.5, 4, 15, 5, 5, 1.1, 0)
        return torch.from_numpy(flow).permute(2, 0, 1)[None]

    flows, masks = [], []
    for t in range(1, len(clip)):
        backward, forward = farneback(clip[t], clip[t - 1]), farneback(clip[t - 1], clip[t])
        flows.append(backward)
        masks.append(reliability(backward, forward))
    return flows, masks


def read_frames(path: str, count: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    """The first ``count`` frames of a video file, each resized to fit ``shape``'s longest side."""
    clip = read_clip(path)
    frames = [clip[i] for i in range(min(count, len(clip)))]
    size = fit_longest(*frames[0].shape[-2:], max(shape))
    return [resize(frame, size) for frame in frames]


class TimedFlow:
    """The method's flow estimator, counting the seconds spent in it (on the CPU, where the benchmark runs)."""

    def __init__(self, flow) -> None:
        self.flow, self.seconds = flow, 0.0

    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        found = self.flow(first, second)
        self.seconds += time.perf_counter() - start
        return found


def warping_error(clip: list[torch.Tensor], flows: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """Lai et al.'s warping error: the mean over consecutive pairs of the masked mean of (O_t - warp(O_t-1))^2."""
    errors = []
    for t in range(1, len(clip)):
        flow = flows[t - 1]
        shape = tuple(clip[t].shape[-2:])
        if tuple(flow.shape[-2:]) != shape:  # the output's size: the flow scaled with it
            scale = torch.tensor([shape[1] / flow.shape[-1], shape[0] / flow.shape[-2]]).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=shape, mode="bilinear", align_corners=False) * scale
        mask = F.interpolate(masks[t - 1], size=shape, mode="nearest")
        difference = (clip[t] - warp(clip[t - 1], flow)).square().mean(1, keepdim=True)
        errors.append(float((mask * difference).sum() / mask.sum().clamp_min(1)))
    return sum(errors) / len(errors)


def sharpness(image: torch.Tensor) -> float:
    dx = image[..., :, 1:] - image[..., :, :-1]
    dy = image[..., 1:, :] - image[..., :-1, :]
    return float(dx.abs().mean() + dy.abs().mean())


def temporal_slice(clip: list[torch.Tensor], row: float = 0.5) -> torch.Tensor:
    """One image row over time: frame t's row ``row`` (a fraction of the height) as row t of a picture."""
    y = int(row * (clip[0].shape[-2] - 1))
    return torch.cat([frame[..., y : y + 1, :] for frame in clip], dim=-2)


def side_by_side(photos: list[torch.Tensor], independent: list[torch.Tensor], temporal: list[torch.Tensor], out: Path):
    """A GIF of the input, the independent frames and the temporal ones side by side (docs/video_side_by_side.gif),
    and their temporal slices stacked (docs/video_slices.png), each titled."""
    titles = ("input", "independent frames", "temporal")

    def panel(image: torch.Tensor, title: str) -> Image.Image:
        picture = to_pil(image)
        canvas = Image.new("RGB", (picture.width, picture.height + 16), "white")
        canvas.paste(picture, (0, 16))
        ImageDraw.Draw(canvas).text((3, 2), title, fill="black")
        return canvas

    def row(images: list[torch.Tensor]) -> Image.Image:
        panels = [panel(image, title) for image, title in zip(images, titles, strict=True)]
        strip = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), "white")
        for i, p in enumerate(panels):
            strip.paste(p, (i * (p.width + 4), 0))
        return strip

    frames = [
        row([resize(a, tuple(b.shape[-2:])), b, c]) for a, b, c in zip(photos, independent, temporal, strict=True)
    ]
    frames = [frame.quantize(colors=128, method=Image.Quantize.MEDIANCUT) for frame in frames]
    frames[0].save(out / "video_side_by_side.gif", save_all=True, append_images=frames[1:], duration=83, loop=0)
    slices = [temporal_slice([resize(p, tuple(independent[0].shape[-2:])) for p in photos])]
    slices += [temporal_slice(independent), temporal_slice(temporal)]
    row([image.repeat_interleave(4, dim=-2) for image in slices]).save(out / "video_slices.png")  # 4 px per frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16_hed_caffe_fp16.safetensors"))
    parser.add_argument("--background", default=str(PAIRS / "lake_sunset_boats.jpg"))
    parser.add_argument("--mover", default=str(ROOT / "example_images" / "chelsea.png"))
    parser.add_argument("--style", default=str(ROOT / "example_images" / "starry_night.jpg"))
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--clip", help="a real clip (video file) instead of the synthetic one, judged with Farneback")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["independent", "temporal"])
    parser.add_argument("--temporal-weight", type=float, default=TEMPORAL_WEIGHT)
    parser.add_argument("--later-iters", type=int, default=LATER_ITERATIONS)
    parser.add_argument("--weights-sweep", type=float, nargs="*", default=[], help="temporal mode at these weights")
    parser.add_argument(
        "--there-and-back",
        action="store_true",
        help="the synthetic clip's camera and mover turn back halfway: its first and last frames are the same "
        "pictures, so their numbers differ only by drift",
    )
    parser.add_argument(
        "--independent-ends",
        action="store_true",
        help=f"the independent mode stylises only the first and last {ENDS} frames (the drift's reference; no "
        "warping error)",
    )
    parser.add_argument("--flow", default="auto", help="the method's flow (the judge uses the exact one)")
    parser.add_argument("--out", default="/tmp/fusion_style_video")
    parser.add_argument(
        "--write-example",
        metavar="PATH",
        help="only write the example clip (24 frames at 12 fps: a pan over grace_hopper.jpg with chelsea.png moving "
        "across, 256 px) to PATH and stop",
    )
    args = parser.parse_args()
    if args.write_example:
        examples = ROOT / "example_images"
        clip, _, _ = synthetic_clip(
            load_image(examples / "grace_hopper.jpg"), load_image(examples / "chelsea.png"), 24, (192, 256)
        )
        writer = ClipWriter(args.write_example, fps=12)
        for frame in clip:
            writer.write(frame)
        writer.close()
        print(f"wrote {args.write_example}")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vgg = load_vgg(args.weights)
    style = load_image(args.style)
    shape = fit_longest(144, 256, args.size)
    if args.clip:
        clip = read_frames(args.clip, args.frames, shape)
        flows, masks = farneback_flows(clip)
    else:
        clip, flows, masks = synthetic_clip(
            load_image(args.background), load_image(args.mover), args.frames, shape, args.there_and_back
        )
    settings = Settings(size=args.size)
    terms = [GlobalStyle(style), LocalStyle(style)]
    flow = flow_estimator(args.flow)
    runs = [(mode, args.temporal_weight) for mode in args.modes]
    runs += [("temporal", weight) for weight in args.weights_sweep]
    results = {
        "clip": args.clip or ("synthetic, there and back" if args.there_and_back else "synthetic"),
        "input_warping_error": warping_error(clip, flows, masks),
        "frames": len(clip),
        "size": args.size,
    }
    print(f"input clip's own warping error (the floor): {results['input_warping_error']:.5f}", flush=True)
    to_pil(temporal_slice(clip)).save(out / "slice_input.png")
    clips: dict[str, list[torch.Tensor]] = {}
    for mode, weight in runs:
        video = VideoSettings(temporal_weight=weight, later_iterations=args.later_iters, independent=mode != "temporal")
        ends_only = video.independent and args.independent_ends and len(clip) > 2 * ENDS
        frames = clip[:ENDS] + clip[-ENDS:] if ends_only else clip
        made, seconds = [], []
        timed = TimedFlow(flow)
        start = time.perf_counter()
        for image in stylize_frames(vgg, frames, terms, settings, video, flow=timed):
            made.append(image)
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
        name = f"temporal_w{weight:g}" if mode == "temporal" else mode + ("_ends" if ends_only else "")
        per_frame = []
        for frame, image in zip(frames, made, strict=True):
            small = resize(image, fit_longest(*image.shape[-2:], 256))
            numbers = metrics.evaluate(vgg, small, frame, style)
            per_frame.append(
                {
                    "style_swd": float(numbers["style_swd"]),
                    "content_dist": float(numbers["content_dist"]),
                    "palette_dist": float(numbers["palette_dist"]),
                    # the photo's structure: falls where repeated warps wear it away (style and sharpness may not)
                    "ssim": float(numbers["ssim"]),
                    "sharpness": sharpness(image),
                }
            )

        def mean(key: str, part: list[dict]) -> float:
            return sum(p[key] for p in part) / len(part)

        record = {
            "warping_error": None if ends_only else warping_error(made, flows, masks),
            "first_frame_s": seconds[0],
            "later_frame_s": sum(seconds[1:]) / max(1, len(seconds) - 1),
            "flow_share": timed.seconds / max(sum(seconds[1:]), 1e-9),  # of the later frames' time
            **{key: mean(key, per_frame) for key in per_frame[0]},
            "first_ten": {key: mean(key, per_frame[:ENDS]) for key in per_frame[0]},
            "last_ten": {key: mean(key, per_frame[-ENDS:]) for key in per_frame[0]},
        }
        results[name] = record
        to_pil(temporal_slice(made)).save(out / f"slice_{name}.png")
        for i in (0, len(made) // 2, len(made) - 1):
            to_pil(made[i]).save(out / f"{name}_{i:03d}.png")
        print(name, json.dumps({k: v for k, v in record.items()}, default=lambda x: round(x, 4)), flush=True)
        clips[name] = made
    if "independent" in clips and len(clips) > 1:
        temporal_name = next(name for name in clips if name != "independent")
        side_by_side(clip, clips["independent"], clips[temporal_name], out)
    (out / "video_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
