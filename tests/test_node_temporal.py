"""Temporal Consistency into Fused Style Optimize (issue 29, first part): the clip is the library's sequence, the
progress bar counts every frame, the preview shows the frame being made, chunks continue, bad inputs are named."""

from __future__ import annotations

import pytest
import torch
from fusion_style.fusion_core import FusionError, GlobalStyle, LocalStyle, Settings
from fusion_style.fusion_core.video import VideoSettings, stylize_frames
from fusion_style.nodes import optimize
from helpers import comfy_images, loss_chain, run_node
from test_nodes import OPTIMIZE, optimize_inputs

# torch.allclose, not torch.testing.assert_close: the latter imports torch.distributed lazily, and an import made
# inside the fake ComfyUI's patched sys.modules is undone after the test and then registers its operators twice.


def still(first, second):  # a stand-in flow estimator: nothing moves
    return torch.zeros(1, 2, *first.shape[-2:])


def temporal(**overrides):
    inputs = {"temporal_weight": 40.0, "later_iterations": 2, "flow": "auto", "independent_frames": False, **overrides}
    (made,) = run_node("FusionStyleTemporalConsistency", **inputs)
    return made


def library(vgg, frames, style_image, video, previous=None):
    style = style_image.movedim(-1, 1).contiguous()
    terms = [
        GlobalStyle(style, weight=20.0, layers=("relu1_2", "relu2_2", "relu3_3")),
        LocalStyle(style, weight=2.5e-5),
    ]
    settings = Settings(**OPTIMIZE)
    clip = [frame[None].movedim(-1, 1).contiguous() for frame in frames]
    return torch.cat(
        [
            image.movedim(1, -1)
            for image in stylize_frames(vgg, clip, terms, settings, video, flow=still, previous=previous)
        ]
    )


def test_a_clip_through_the_nodes_is_the_library_sequence(comfyui, node_vgg, style_image, monkeypatch):
    asked = []
    monkeypatch.setattr(optimize, "flow_estimator", lambda name, **kw: asked.append(name) or still)
    frames = comfy_images(3, 32, 32)
    made = temporal()
    (image,) = run_node(
        "FusionStyleFusedOptimize", **optimize_inputs(node_vgg, frames, loss_chain(style_image), temporal=made)
    )
    assert asked == ["auto"]
    expected = library(node_vgg, frames, style_image, VideoSettings(temporal_weight=40.0, later_iterations=2))
    assert torch.allclose(image, expected, rtol=1e-5, atol=1e-6)
    # the bar: the first frame's 3 iterations (one level), then 2 per later frame, to 7 in all
    assert [value for value, _, _ in comfyui.updates] == list(range(1, 8))
    assert {total for _, total, _ in comfyui.updates} == {7}


def test_a_chunk_continues_from_the_previous_chunks_last_frame(comfyui, node_vgg, style_image, monkeypatch):
    monkeypatch.setattr(optimize, "flow_estimator", lambda name, **kw: still)
    frames = comfy_images(2, 32, 32)
    last, photo = comfy_images(1, 32, 32, seed=7), comfy_images(1, 32, 32, seed=8)
    made = temporal(previous_frame=last, previous_photo=photo)
    (image,) = run_node(
        "FusionStyleFusedOptimize", **optimize_inputs(node_vgg, frames, loss_chain(style_image), temporal=made)
    )
    previous = (last.movedim(-1, 1).contiguous(), photo.movedim(-1, 1).contiguous())
    video = VideoSettings(temporal_weight=40.0, later_iterations=2)
    assert torch.allclose(image, library(node_vgg, frames, style_image, video, previous), rtol=1e-5, atol=1e-6)
    assert {total for _, total, _ in comfyui.updates} == {4}  # every frame a later one: 2 + 2


def test_independent_frames_through_the_nodes_are_the_batch_of_stills(comfyui, node_vgg, style_image):
    frames = comfy_images(2, 32, 32)
    chain = loss_chain(style_image)
    (clip,) = run_node(
        "FusionStyleFusedOptimize",
        **optimize_inputs(node_vgg, frames, chain, temporal=temporal(independent_frames=True)),
    )
    (batch,) = run_node("FusionStyleFusedOptimize", **optimize_inputs(node_vgg, frames, chain))
    assert torch.allclose(clip, batch, rtol=1e-5, atol=1e-6)


def test_a_previous_frame_without_its_photo_is_refused():
    with pytest.raises(FusionError, match="previous_frame and previous_photo go together"):
        temporal(previous_frame=comfy_images(1, 32, 32))
