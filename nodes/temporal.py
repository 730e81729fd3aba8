"""Temporal Consistency: turns Fused Style Optimize's content batch into a clip stylised in order
(fusion_core/video.py), each frame starting from the previous result warped into it along the optical flow."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..fusion_core.errors import FusionError
from ..fusion_core.flow import FLOW_NAMES
from ..fusion_core.video import LATER_ITERATIONS, TEMPORAL_WEIGHT, VideoSettings
from .common import CATEGORY, PACK_ALIASES
from .tensors import split_images

TEMPORAL = "FUSION_TEMPORAL"


@dataclass
class Temporal:
    """What the Temporal Consistency node hands to Fused Style Optimize."""

    video: VideoSettings
    flow: str
    previous: tuple[Tensor, Tensor] | None  # (the last stylised frame, its photo) of the chunk before


class FusionStyleTemporalConsistency:
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "For video: connect to Fused Style Optimize's 'temporal' input and give it the clip's frames as its content "
        "batch. Frames are then stylised in order: each after the first starts from the previous result moved along "
        "the optical flow, and a temporal loss keeps it there where the flow is reliable, so strokes stay put "
        "instead of flickering."
    )
    RETURN_TYPES = (TEMPORAL,)
    RETURN_NAMES = ("temporal",)
    OUTPUT_TOOLTIPS = ("The temporal settings, for Fused Style Optimize's 'temporal' input.",)
    FUNCTION = "make"
    SEARCH_ALIASES = [*PACK_ALIASES, "video", "temporal", "flicker", "optical flow"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "temporal_weight": (
                    "FLOAT",
                    {
                        "default": TEMPORAL_WEIGHT,
                        "min": 0.0,
                        "max": 100000.0,
                        "step": 1.0,
                        "tooltip": "How firmly each frame is held to the previous result moved along the flow, where "
                        "the flow is reliable. Higher: steadier, less change between frames; 0: the moved start "
                        "only.",
                    },
                ),
                "later_iterations": (
                    "INT",
                    {
                        "default": LATER_ITERATIONS,
                        "min": 1,
                        "max": 5000,
                        "tooltip": "Iterations of every frame after the first, at the output size only (the moved "
                        "start is most of the way there). The first frame gets the full pyramid.",
                    },
                ),
                "flow": (
                    ["auto", *FLOW_NAMES],
                    {
                        "default": "auto",
                        "tooltip": "Optical flow: 'dis' (OpenCV's DIS; needs opencv-python-headless), 'raft' "
                        "(torchvision's RAFT: raft_large.safetensors in models/vgg, else downloaded once, 21 MB), "
                        "'auto': DIS where OpenCV is installed, else RAFT.",
                    },
                ),
                "independent_frames": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Stylise every frame on its own, as a still (flickers; for comparison).",
                    },
                ),
            },
            "optional": {
                "previous_frame": (
                    "IMAGE",
                    {
                        "tooltip": "To continue a clip processed in chunks without a seam: the previous chunk's last "
                        "stylised frame (its output's last image)."
                    },
                ),
                "previous_photo": (
                    "IMAGE",
                    {"tooltip": "The photo of previous_frame: the previous chunk's last input frame."},
                ),
            },
        }

    def make(
        self, temporal_weight, later_iterations, flow, independent_frames, previous_frame=None, previous_photo=None
    ):
        video = VideoSettings(
            temporal_weight=float(temporal_weight),
            later_iterations=int(later_iterations),
            independent=bool(independent_frames),
        )
        video.validate()
        if (previous_frame is None) != (previous_photo is None):
            raise FusionError(
                "Temporal Consistency: previous_frame and previous_photo go together (the previous chunk's last "
                "stylised frame and its input frame); connect both or neither"
            )
        previous = None
        if previous_frame is not None:
            previous = (
                split_images("previous_frame", previous_frame)[-1],
                split_images("previous_photo", previous_photo)[-1],
            )
        return (Temporal(video, flow, previous),)
