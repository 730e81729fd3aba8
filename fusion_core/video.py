"""Frame sequences stylised in order, each frame after the first starting from the previous stylised frame warped
into it and held there by the temporal term where the flow can be trusted (temporal.py; Ruder et al. 2016).

The first frame gets the full coarse-to-fine optimisation. A later frame is optimised at the output size only,
from the warped previous result, for ``VideoSettings.later_iterations``: the warped start is already most of the
way there; a frame whose photo equals the one before (a held frame) keeps the previous result as it is.
``independent=True`` stylises every frame on its own, as a still (the baseline to compare with).

Frames stay where the caller keeps them (host memory); the device holds one frame's work and the two flows it
needs at a time. ``stylize_frames`` yields each result as soon as it is made, on the CPU, so a caller can write it
before the next frame starts: a cancelled clip keeps the frames already written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .config import Progress, Settings, StyleTerm
from .errors import FusionError
from .flow import FlowEstimator
from .geometry import fit_longest
from .images import check_image, resize
from .stylize import stylize
from .temporal import TemporalTerm, reliability, warp_spline
from .vgg import VGGFeatures

# Chosen with benchmarks/video.py (docs/video.md): 200 holds the reliable pixels to the moved previous result
# (warping error a tenth of independent frames'; 50 a seventh, 1000 softer and further from the style), and 30
# iterations make a later frame cost under half the first one's full run
TEMPORAL_WEIGHT = 200.0
LATER_ITERATIONS = 30


@dataclass
class VideoSettings:
    """How frames after the first are made (``Settings`` says how each frame is optimised)."""

    temporal_weight: float = TEMPORAL_WEIGHT  # 0: the warped start only
    later_iterations: int = LATER_ITERATIONS  # iterations of a frame after the first, at the output size only
    independent: bool = False  # every frame on its own, as a still (today's behaviour; the baseline)

    def validate(self) -> None:
        if not self.temporal_weight >= 0:
            raise FusionError(f"temporal_weight: expected a number >= 0, got {self.temporal_weight}")
        if isinstance(self.later_iterations, bool) or not isinstance(self.later_iterations, int):
            raise FusionError(f"later_iterations: expected a whole number >= 1, got {self.later_iterations!r}")
        if self.later_iterations < 1:
            raise FusionError(f"later_iterations: expected a whole number >= 1, got {self.later_iterations}")


# (frame index from 0, frame count, the frame's Progress)
FrameProgress = Callable[[int, int, Progress], None]


def stylize_frames(
    vgg: VGGFeatures,
    frames: Sequence[Tensor],
    styles: Sequence[StyleTerm],
    settings: Settings | None = None,
    video: VideoSettings | None = None,
    *,
    flow: FlowEstimator | None = None,
    previous: tuple[Tensor, Tensor] | None = None,
    on_progress: FrameProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Tensor]:
    """Stylise ``frames`` (each (1, 3, H, W), RGB 0..1, one size) in order; yields each result (1, 3, h, w) on
    the CPU as it is made.

    ``flow`` estimates the optical flow between two photos (flow.py); it is needed unless ``video.independent``.
    ``previous`` = (the last stylised frame, its photo) of the chunk before, to continue a clip processed in
    chunks without a seam: the first frame here is then treated as a later frame. ``on_progress`` receives the
    frame's index, the frame count and the frame's ``Progress`` after every iteration; ``should_stop`` as in
    ``stylize`` (``Cancelled`` between iterations).
    """
    settings, video = settings or Settings(), video or VideoSettings()
    video.validate()
    if not frames:
        raise FusionError("frames: expected at least one frame, got none")
    shape = tuple(check_image("frames[0]", frames[0]).shape[-2:])
    for i, frame in enumerate(frames):
        if tuple(check_image(f"frames[{i}]", frame).shape[-2:]) != shape:
            raise FusionError(
                f"frames[{i}]: every frame must have the first frame's size {shape[1]}x{shape[0]} px, "
                f"got {frame.shape[-1]}x{frame.shape[-2]}"
            )
    if not video.independent and flow is None:
        raise FusionError("flow: temporal mode needs an optical flow estimator (flow.flow_estimator)")
    output = fit_longest(*shape, settings.size)
    later = replace(settings, levels=1, iterations=video.later_iterations, final_iterations=0)
    last: Tensor | None = None  # the previous stylised frame, at the output size
    last_photo: Tensor | None = None  # its photo, at the output size
    if previous is not None:
        last = resize(check_image("previous[0]", previous[0]), output)
        last_photo = resize(check_image("previous[1]", previous[1]), output)
    count = len(frames)
    for i, frame in enumerate(frames):
        report = None if on_progress is None else (lambda p, i=i: on_progress(i, count, p))
        photo = frame.to(vgg.device)
        here = resize(photo, output)  # the photo at the output size: the flow's and the next frame's
        if not video.independent and last_photo is not None and torch.equal(here.cpu(), last_photo):
            # the same photo as the frame before (a held frame): the same picture, not one optimised further
            if on_progress is not None:
                on_progress(i, count, _held_progress(video))
            yield last.clone()
            continue
        if video.independent or last is None:
            image = stylize(vgg, photo, styles, settings, on_progress=report, should_stop=should_stop)
        else:
            warped, mask = _warped_previous(flow, last.to(vgg.device), last_photo.to(vgg.device), here)
            term = TemporalTerm(warped, mask, video.temporal_weight) if video.temporal_weight > 0 else None
            image = stylize(
                vgg,
                photo,
                styles,
                later,
                on_progress=report,
                should_stop=should_stop,
                init_image=warped,
                pixel_term=term,
            )
        last, last_photo = image.cpu(), here.cpu()
        yield last


def _held_progress(video: VideoSettings) -> Progress:
    """The report of a held frame: its iterations counted as done at once."""
    n = video.later_iterations
    return Progress(level=1, levels=1, iteration=n, iterations=n, step=n, steps=n)


def _warped_previous(flow: FlowEstimator, last: Tensor, last_photo: Tensor, photo: Tensor) -> tuple[Tensor, Tensor]:
    """The previous stylised frame moved into this one along the photos' flow, and where that can be trusted."""
    with torch.no_grad():
        backward = flow(photo, last_photo)  # this frame -> the previous one
        forward = flow(last_photo, photo)  # the previous frame -> this one
        # B-spline: a bilinear warp's blur, or a cubic one's sharpening, would add up frame after frame
        return warp_spline(last, backward).clamp(0, 1), reliability(backward, forward)
