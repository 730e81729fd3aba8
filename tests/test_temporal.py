"""Frames in order (issue 29, first part): warping against exactly shifted images, the reliability mask against a
synthetic occluder whose uncovered pixels are known, the temporal term's gradient against finite differences, the
sequence driver against the still path, its errors, cancel, and the flow estimators' plumbing."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import smooth_image, tiny_vgg
from safetensors.torch import save_file

from fusion_core import Cancelled, FusionError, GlobalStyle, LocalStyle, Settings
from fusion_core import stylize as stylize_module
from fusion_core import video as video_module
from fusion_core.flow import DISFlow, RaftFlow, flow_estimator
from fusion_core.temporal import TemporalTerm, reliability, temporal_gradient, temporal_loss, warp, warp_spline
from fusion_core.video import VideoSettings, stylize_frames

HAS_CV2 = importlib.util.find_spec("cv2") is not None


def constant_flow(dx: float, dy: float, h: int, w: int) -> torch.Tensor:
    flow = torch.zeros(1, 2, h, w)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def test_warp_by_a_whole_pixel_translation_is_the_shifted_image():
    image = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    warped = warp(image, constant_flow(3, -2, 20, 24))
    # out(y, x) = image(y - 2, x + 3) wherever that lies inside the image
    torch.testing.assert_close(warped[..., 2:, :-3], image[..., :-2, 3:], rtol=0, atol=1e-5)


def test_warp_along_an_affine_flow_samples_a_linear_image_exactly():
    h, w = 30, 40
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    image = torch.stack([0.01 * xs + 0.02 * ys, 0.5 - 0.01 * ys, 0.003 * xs * 1.0])[None]  # linear per channel
    # a small rotation and scale about the centre: every sample point stays inside the image
    u = 0.05 * (xs - w / 2) - 0.04 * (ys - h / 2)
    v = 0.04 * (xs - w / 2) + 0.05 * (ys - h / 2)
    warped = warp(image, torch.stack([u, v])[None])
    x, y = xs + u, ys + v
    expected = torch.stack([0.01 * x + 0.02 * y, 0.5 - 0.01 * y, 0.003 * x])[None]  # bilinear is exact on a plane
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)  # outside, the border is sampled instead
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(warped[..., inside], expected[..., inside], rtol=0, atol=1e-9)


def test_the_spline_warp_passes_through_the_pixels_and_reproduces_a_cubic_exactly():
    """A cubic B-spline interpolant: at whole-pixel offsets it is the shifted image (to the prefilter's cut), and
    it samples a cubic polynomial exactly between the pixels (away from the border, where the mirror extension is
    not the polynomial); far outside the image it gives the border's value, as ``warp`` does."""
    image = torch.rand(1, 3, 30, 41, generator=torch.Generator().manual_seed(3))
    whole_pixels = constant_flow(2, -1, 30, 41)
    torch.testing.assert_close(warp_spline(image, whole_pixels), warp(image, whole_pixels), rtol=0, atol=1e-4)
    torch.testing.assert_close(warp_spline(image, constant_flow(0, 0, 30, 41)), image, rtol=0, atol=1e-4)
    h, w = 40, 50
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def cubic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1e-4 * (x - 20) ** 3 - 2e-4 * (y - 15) ** 2 * (x - 10) + 0.01 * y

    flow = torch.stack([0.4 * torch.sin(ys / 7), -0.6 + 0.3 * torch.cos(xs / 9)])[None]  # fractional, varying
    warped = warp_spline(cubic(xs, ys)[None, None].expand(1, 2, h, w), flow)
    expected = cubic(xs + flow[0, 0], ys + flow[0, 1])
    torch.testing.assert_close(
        warped[0, :, 10:-10, 10:-10], expected[10:-10, 10:-10].expand(2, -1, -1), atol=1e-5, rtol=0
    )
    far = constant_flow(0, 0, 30, 41)
    far[0, :, 0, 0] = torch.tensor([-60.0, 45.0])
    torch.testing.assert_close(warp_spline(image, far)[..., 0, 0], warp(image, far)[..., 0, 0], rtol=0, atol=1e-4)


def test_a_chain_of_spline_warps_neither_blurs_away_nor_sharpens_up_the_detail():
    """A clip's later frames each start from the frame before, warped: sixty warps of a slow pan, thirty out and
    thirty back, return the picture to where it was (judged where no point ever left the frame). Bilinear
    sampling's blur adds up (a fifth of the gradient left); cubic convolution with torch's a = -0.75
    (``F.grid_sample``'s bicubic mode) amplifies (more than twice the gradient); the B-spline warp keeps nearly all
    of it, never more, and ends far closer to the picture it started from."""
    h, w = 64, 96
    image = smooth_image(h, w, seed=4)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")

    def bicubic(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        grid = torch.stack([2 * (xs + flow[:, 0]) / (w - 1) - 1, 2 * (ys + flow[:, 1]) / (h - 1) - 1], -1)
        return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=True)

    def inner(x: torch.Tensor) -> torch.Tensor:  # 30 x (0.7, 0.4) px from every border: never outside the frame
        return x[..., 16:-16, 24:-24]

    def detail(x: torch.Tensor) -> float:
        x = inner(x)
        return float((x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())

    ends, error = {}, {}
    for name, step in {"bilinear": warp, "bicubic": bicubic, "spline": warp_spline}.items():
        x = image
        for t in range(60):
            x = step(x, constant_flow(0.7, 0.4, h, w) * (1 if t < 30 else -1)).clamp(0, 1)
        ends[name] = detail(x) / detail(image)
        error[name] = float(inner(x - image).square().mean())
    assert ends["bilinear"] < 0.5 and ends["bicubic"] > 1.5
    assert 0.85 < ends["spline"] <= 1.0
    assert error["spline"] < 0.05 * min(error["bilinear"], error["bicubic"])


def test_the_reliability_mask_is_zero_exactly_where_a_moving_square_uncovers_the_background():
    # Frame t-1: a square at columns 10..19, rows 8..17 of a still background; frame t: the square 4 px to the
    # right. The pixels it uncovers (columns 10..13 of those rows) are not in frame t-1 (the square hid them).
    h, w, d = 28, 36, 4
    rows = slice(8, 18)
    backward = torch.zeros(1, 2, h, w)  # frame t -> t-1
    backward[0, 0, rows, 10 + d : 20 + d] = -d
    forward = torch.zeros(1, 2, h, w)  # frame t-1 -> t
    forward[0, 0, rows, 10:20] = d
    mask = reliability(backward, forward)[0, 0]
    assert (mask[rows, 10 : 10 + d] == 0).all()  # uncovered: occluded in t-1
    assert (mask[10:16, 10 + d + 2 : 20 + d - 2] == 1).all()  # the square's inside, away from its edges
    background = torch.ones(h, w, dtype=torch.bool)
    background[6:20, 8:26] = False  # the square, the strip and their edges with a margin
    assert (mask[background] == 1).all()
    # the motion boundary: the square's edges in frame t
    assert (mask[rows, 10 + d] == 0).all() and (mask[rows, 19 + d] == 0).all()
    assert (mask[8, 10 + d : 20 + d] == 0).all() and (mask[17, 10 + d : 20 + d] == 0).all()


def test_the_reliability_mask_is_zero_where_a_pan_brings_in_what_the_frame_before_did_not_show():
    # A camera pan: every point of frame t was 2.5 px further right (and 1.5 px lower) in frame t-1. Columns
    # x > w - 1 - 2.5 and rows y > h - 1 - 1.5 were outside frame t-1; the forward-backward check cannot see it (the
    # warp reads frame t-1's border there and the round trip closes), so without its own test they would be held
    # to the border's values.
    h, w = 20, 24
    mask = reliability(constant_flow(2.5, 1.5, h, w), constant_flow(-2.5, -1.5, h, w))[0, 0]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    seen = (xs + 2.5 <= w - 1) & (ys + 1.5 <= h - 1)
    assert torch.equal(mask, seen.float())
    assert int((mask == 0).sum()) == 3 * h + 2 * w - 6  # three columns and two rows brought in


def test_the_temporal_terms_gradient_is_the_finite_difference():
    generator = torch.Generator().manual_seed(1)
    image, warped = torch.rand(1, 3, 6, 7, generator=generator, dtype=torch.float64), torch.rand(1, 3, 6, 7).double()
    mask = (torch.rand(1, 1, 6, 7, generator=generator) > 0.3).double()
    grad = temporal_gradient(image, warped, mask)
    step = 1e-6
    for index in [(0, 0, 0, 0), (0, 1, 3, 4), (0, 2, 5, 6), (0, 1, 2, 2)]:
        plus, minus = image.clone(), image.clone()
        plus[index] += step
        minus[index] -= step
        numeric = (temporal_loss(plus, warped, mask) - temporal_loss(minus, warped, mask)) / (2 * step)
        assert float(grad[index]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-12)
    # and autograd agrees everywhere
    x = image.clone().requires_grad_(True)
    temporal_loss(x, warped, mask).backward()
    torch.testing.assert_close(x.grad, grad)


def test_the_temporal_term_adds_its_weighted_gradient_and_refuses_a_negative_weight():
    image, warped = smooth_image(10, 12, seed=1), smooth_image(10, 12, seed=2)
    mask = torch.ones(1, 1, 10, 12)
    grad = torch.zeros_like(image)
    value = TemporalTerm(warped, mask, 3.0).add_to(image, grad)
    torch.testing.assert_close(grad, 3.0 * temporal_gradient(image, warped, mask))
    assert float(value) == pytest.approx(3.0 * float(temporal_loss(image, warped, mask)))
    with pytest.raises(FusionError, match="temporal_weight: expected a number >= 0"):
        TemporalTerm(warped, mask, -1.0)


FAST = dict(size=64, levels=2, iterations=3, final_iterations=0)


@pytest.fixture
def clip():
    vgg = tiny_vgg()
    style = smooth_image(48, 48, seed=9)
    frames = [smooth_image(30, 40, seed=s) for s in (1, 2, 3)]
    return vgg, [GlobalStyle(style), LocalStyle(style)], frames


def still_flow(first, second):  # a stand-in estimator: nothing moves
    return torch.zeros(1, 2, *first.shape[-2:])


def test_independent_frames_are_the_still_path_frame_by_frame(clip):
    vgg, styles, frames = clip
    settings = Settings(**FAST)
    results = list(stylize_frames(vgg, frames, styles, settings, VideoSettings(independent=True)))
    for frame, result in zip(frames, results, strict=True):
        assert torch.equal(result, stylize_module.stylize(vgg, frame, styles, settings))


def test_a_one_frame_clip_in_temporal_mode_is_the_still(clip):
    vgg, styles, frames = clip
    settings = Settings(**FAST)
    (result,) = stylize_frames(vgg, frames[:1], styles, settings, flow=still_flow)
    assert torch.equal(result, stylize_module.stylize(vgg, frames[0], styles, settings))


def test_a_later_frame_starts_from_the_warped_previous_result_and_is_held_there(clip, monkeypatch):
    vgg, styles, frames = clip
    calls = []
    original = video_module.stylize

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(video_module, "stylize", recording)
    moved = lambda first, second: constant_flow(0.5, 0.0, *first.shape[-2:])  # noqa: E731
    video = VideoSettings(temporal_weight=50.0, later_iterations=2)
    results = list(stylize_frames(vgg, frames, styles, Settings(**FAST), video, flow=moved))
    assert "init_image" not in calls[0]  # the first frame: the still path
    for i in (1, 2):
        start = warp_spline(results[i - 1], constant_flow(0.5, 0, 48, 64)).clamp(0, 1)  # B-spline, in 0..1
        torch.testing.assert_close(calls[i]["init_image"], start)
        assert calls[i]["pixel_term"].weight == 50.0
    # weight 0: the warped start only
    calls.clear()
    list(stylize_frames(vgg, frames[:2], styles, Settings(**FAST), VideoSettings(temporal_weight=0), flow=moved))
    assert calls[1]["pixel_term"] is None and calls[1]["init_image"] is not None


def test_the_temporal_term_keeps_a_later_frame_closer_to_the_warped_previous_one(clip):
    vgg, styles, frames = clip
    settings = Settings(**FAST)
    distances = []
    for weight in (0.0, 1e4):
        first, second = stylize_frames(
            vgg,
            frames[:2],
            styles,
            settings,
            VideoSettings(temporal_weight=weight, later_iterations=6),
            flow=still_flow,
        )
        distances.append(float((second - first).square().mean()))
    assert distances[1] < 0.5 * distances[0]


def test_bad_clips_are_refused_naming_the_input(clip):
    vgg, styles, frames = clip
    with pytest.raises(FusionError, match=r"frames\[1\]: every frame must have the first frame's size 40x30 px"):
        list(stylize_frames(vgg, [frames[0], smooth_image(32, 40, seed=4)], styles, flow=still_flow))
    with pytest.raises(FusionError, match="frames: expected at least one frame"):
        list(stylize_frames(vgg, [], styles, flow=still_flow))
    with pytest.raises(FusionError, match="flow: temporal mode needs an optical flow estimator"):
        list(stylize_frames(vgg, frames, styles))
    with pytest.raises(FusionError, match="later_iterations"):
        list(stylize_frames(vgg, frames, styles, video=VideoSettings(later_iterations=0), flow=still_flow))


def test_cancel_in_the_middle_keeps_the_frames_already_made(clip):
    vgg, styles, frames = clip
    settings = Settings(**FAST)
    seen, made = [], []
    stop = lambda: len(seen) > 0 and seen[-1][0] == 1  # noqa: E731 - once the second frame has begun
    with pytest.raises(Cancelled):
        for image in stylize_frames(
            vgg,
            frames,
            styles,
            settings,
            flow=still_flow,
            on_progress=lambda i, n, p: seen.append((i, n)),
            should_stop=stop,
        ):
            made.append(image)
    assert len(made) == 1 and torch.equal(made[0], stylize_module.stylize(vgg, frames[0], styles, settings))
    assert seen[0] == (0, 3)


@pytest.mark.skipif(not HAS_CV2, reason="OpenCV (opencv-python-headless) is not installed: DIS flow not tested")
def test_dis_flow_finds_a_translation():
    image = smooth_image(96, 128, seed=3)
    shifted = torch.roll(image, shifts=(0, 3), dims=(2, 3))  # content moves 3 px to the right
    flow = DISFlow()(image, shifted)
    assert flow.shape == (1, 2, 96, 128)
    inner = flow[..., 16:-16, 16:-16]
    assert abs(float(inner[:, 0].median()) - 3) < 0.5 and abs(float(inner[:, 1].median())) < 0.5


def test_without_opencv_dis_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("no cv2")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(FusionError, match="pip install opencv-python-headless"):
        DISFlow()
    with pytest.raises(FusionError, match="install OpenCV .* or give torchvision RAFT's raft_large weights"):
        flow_estimator("auto")


def test_raft_plumbing_with_random_weights(tmp_path):
    # The real raft_large weights cannot be downloaded here: random ones test the loading, the padding to a multiple
    # of 8 px and the shape of what comes back, not the flow's quality.
    raft_large = pytest.importorskip(
        "torchvision.models.optical_flow", reason="torchvision is not installed"
    ).raft_large

    torch.manual_seed(0)
    path = tmp_path / "raft.safetensors"
    save_file({k: v.contiguous() for k, v in raft_large(weights=None).state_dict().items()}, str(path))
    estimator = flow_estimator("raft", raft_weights=path)
    assert isinstance(estimator, RaftFlow)
    flow = estimator(smooth_image(60, 70, seed=1), smooth_image(60, 70, seed=2))
    assert flow.shape == (1, 2, 60, 70) and torch.isfinite(flow).all()
    with pytest.raises(FusionError, match="weights file not found"):
        flow_estimator("raft", raft_weights=tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FusionError, match="is not a raft_large state dict"):
        flow_estimator("raft", raft_weights=tmp_path / "other.safetensors")


def test_raft_weights_are_fetched_once_checked_and_kept_as_safetensors(tmp_path):
    import hashlib

    raft_large = pytest.importorskip(
        "torchvision.models.optical_flow", reason="torchvision is not installed"
    ).raft_large

    from fusion_core.weights import RAFT_FILENAME, download_raft, find_raft

    torch.manual_seed(0)
    checkpoint = tmp_path / "served" / "raft.pth"
    checkpoint.parent.mkdir()
    torch.save(raft_large(weights=None).state_dict(), checkpoint)
    prefix = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:8]
    models = tmp_path / "models"
    with pytest.raises(FusionError, match="expected one starting 00000000; the file was deleted"):
        download_raft(models, url=checkpoint.as_uri(), sha256_prefix="00000000")
    assert list(models.iterdir()) == []  # nothing that looks like a model is left
    path = download_raft(models, url=checkpoint.as_uri(), sha256_prefix=prefix)
    assert path == models / RAFT_FILENAME and find_raft([models], download=False) == path
    flow = flow_estimator("raft", models_dirs=[models])(smooth_image(40, 48, seed=1), smooth_image(40, 48, seed=2))
    assert flow.shape == (1, 2, 40, 48)
    with pytest.raises(FusionError, match="flow 'raft': weights not found; put raft_large.safetensors"):
        find_raft([tmp_path / "empty"], download=False)


def test_a_clip_of_identical_frames_gives_identical_outputs_in_temporal_mode(clip):
    vgg, styles, frames = clip
    settings = Settings(**FAST)
    held = [frames[0], frames[0].clone(), frames[0].clone(), frames[1]]
    reports = []
    results = list(
        stylize_frames(vgg, held, styles, settings, flow=still_flow, on_progress=lambda i, n, p: reports.append(i))
    )
    assert torch.equal(results[0], stylize_module.stylize(vgg, frames[0], styles, settings))
    assert torch.equal(results[1], results[0]) and torch.equal(results[2], results[0])
    assert not torch.equal(results[3], results[0])  # a new photo: optimised again
    assert sorted(set(reports)) == [0, 1, 2, 3]  # the held frames are reported too (a progress bar counts them)
