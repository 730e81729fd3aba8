"""Clips from the command line (issue 29, first part): a folder of frames or a video file in, a folder or a video
file out, frame by frame; errors naming the input; cancel keeps the frames already written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import smooth_image, write_tiny_vgg
from PIL import Image

from fusion_core import Cancelled, FusionError, GlobalStyle, LocalStyle, Settings, cli, load_image, load_vgg
from fusion_core.media import ClipWriter, read_clip
from fusion_core.video import VideoSettings, stylize_frames

HAS_AV = importlib.util.find_spec("av") is not None
needs_av = pytest.mark.skipif(not HAS_AV, reason="PyAV (av) is not installed: video files not tested")


def save_png(tensor: torch.Tensor, path: Path) -> None:
    Image.fromarray((tensor[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_tiny_vgg(folder / "tiny.safetensors", arch="vgg16")
    save_png(smooth_image(48, 48, seed=2), folder / "style.png")
    frames = folder / "frames"
    frames.mkdir()
    for i, seed in enumerate((5, 6, 7)):
        save_png(smooth_image(40, 56, seed=seed), frames / f"f{2 - i}.png")  # names sort in the reverse order
    return folder


def run(files, *extra) -> int:
    base = ["--weights", str(files / "tiny.safetensors"), "--style", str(files / "style.png")]
    return cli.main([*base, "--size", "64", "--levels", "2", "--iters", "3", "--final-iters", "0", "--quiet", *extra])


def test_a_folder_is_read_in_name_order_and_refused_without_images_or_with_mixed_sizes(files, tmp_path):
    frames = read_clip(files / "frames")
    assert len(frames) == 3 and frames[0].shape == (1, 3, 40, 56)
    torch.testing.assert_close(frames[0], load_image(files / "frames" / "f0.png"))
    with pytest.raises(FusionError, match="content: no images .* in the folder"):
        read_clip(tmp_path)
    save_png(smooth_image(40, 56, seed=1), tmp_path / "a.png")
    save_png(smooth_image(30, 56, seed=1), tmp_path / "b.png")
    with pytest.raises(FusionError, match="content: b.png is 56x30 px, the first frame 56x40 px"):
        read_clip(tmp_path)


def test_independent_frames_from_the_command_line_are_the_library_stills(files, tmp_path):
    out = tmp_path / "out"
    assert run(files, "--content", str(files / "frames"), "--out", str(out), "--independent-frames") == 0
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]
    vgg = load_vgg(files / "tiny.safetensors")
    style = load_image(files / "style.png")
    settings = Settings(size=64, levels=2, iterations=3, final_iterations=0)
    clip = read_clip(files / "frames")
    expected = stylize_frames(
        vgg, clip, [GlobalStyle(style), LocalStyle(style)], settings, VideoSettings(independent=True)
    )
    for path, image in zip(written, expected, strict=True):
        ours = np.asarray(Image.open(path)).astype(int)
        theirs = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(int)
        assert np.abs(ours - theirs).max() <= 1


def test_cancel_keeps_the_frames_already_written(files, tmp_path, monkeypatch):
    def two_then_cancel(*args, **kwargs):
        yield smooth_image(48, 64, seed=1)
        yield smooth_image(48, 64, seed=2)
        raise Cancelled("stopped by the caller")

    monkeypatch.setattr(cli, "stylize_frames", two_then_cancel)
    out = tmp_path / "partial"
    assert run(files, "--content", str(files / "frames"), "--out", str(out), "--independent-frames") == 130
    assert sorted(p.name for p in out.iterdir()) == ["frame_00001.png", "frame_00002.png"]


@needs_av
def test_a_video_file_round_trip_and_cancel_keeps_a_playable_file(files, tmp_path):
    path = tmp_path / "clip.mp4"
    writer = ClipWriter(path, fps=12)
    for seed in (1, 2, 3, 4):
        writer.write(smooth_image(40, 56, seed=seed))
    writer.close()
    clip = read_clip(path)
    assert len(clip) == 4 and clip[0].shape == (1, 3, 40, 56) and clip.fps == pytest.approx(12)
    # lossy, but the same pictures
    assert float((clip[2] - smooth_image(40, 56, seed=3)).abs().mean()) < 0.05
    out = tmp_path / "styled.mp4"
    assert run(files, "--content", str(path), "--out", str(out), "--independent-frames") == 0
    assert len(read_clip(out)) == 4


@needs_av
def test_an_unreadable_video_is_refused_naming_it(files, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(FusionError, match="content: broken.mp4 is not a readable video"):
        read_clip(bad)
    assert run(files, "--content", str(bad), "--out", str(tmp_path / "o")) == 2


def test_clip_outputs_are_checked_before_any_work(files, tmp_path, capsys):
    assert run(files, "--content", str(files / "frames"), "--out", str(tmp_path / "o.png")) == 2
    assert "for a clip give a folder (frames as numbered PNGs) or a video file" in capsys.readouterr().err


def test_temporal_frames_from_the_command_line_are_the_library_sequence(files, tmp_path, monkeypatch):
    def still(first, second):  # a stand-in flow estimator: nothing moves
        return torch.zeros(1, 2, *first.shape[-2:])

    asked = []
    monkeypatch.setattr(cli, "flow_estimator", lambda name, **kwargs: asked.append(name) or still)
    out = tmp_path / "temporal"
    assert run(files, "--content", str(files / "frames"), "--out", str(out), "--temporal-weight", "30") == 0
    assert asked == ["auto"]
    vgg = load_vgg(files / "tiny.safetensors")
    style = load_image(files / "style.png")
    settings = Settings(size=64, levels=2, iterations=3, final_iterations=0)
    video = VideoSettings(temporal_weight=30.0)
    expected = stylize_frames(
        vgg, read_clip(files / "frames"), [GlobalStyle(style), LocalStyle(style)], settings, video, flow=still
    )
    for path, image in zip(sorted(out.iterdir()), expected, strict=True):
        ours = np.asarray(Image.open(path)).astype(int)
        assert np.abs(ours - (image[0].permute(1, 2, 0).numpy() * 255).round().astype(int)).max() <= 1
