"""Optical flow between two frames, from libraries made for it, behind one small interface.

A ``FlowEstimator`` is called with two frames (1, 3, H, W, RGB 0..1) and returns the flow from the first to the
second, (1, 2, H, W) in pixels: for each pixel x of the first frame, where it is in the second (channel 0 the
horizontal displacement, 1 the vertical). Two are offered, each imported only when used:

- ``DISFlow``: OpenCV's DIS optical flow (``pip install opencv-python-headless``); no download, fast on a CPU.
- ``RaftFlow``: torchvision's RAFT (``raft_large``), on the frames' device; its weights are a file
  (``.safetensors``, or ``.pth`` read with ``weights_only=True``), fetched once from torchvision's server when asked
  (``weights.find_raft``), never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from .errors import FusionError
from .weights import find_raft

FLOW_NAMES = ("dis", "raft")
RAFT_MIN_SIDE = 128  # RAFT's correlation pyramid needs feature maps of 16 positions (at 1/8 of the frame)


class FlowEstimator(Protocol):
    def __call__(self, first: Tensor, second: Tensor) -> Tensor:
        """The flow (1, 2, H, W) in pixels from ``first`` to ``second`` (both (1, 3, H, W), RGB 0..1)."""
        ...


class DISFlow:
    """OpenCV's Dense Inverse Search flow (Kroeger et al. 2016) on the frames' grey levels, on the CPU."""

    PRESETS = ("ultrafast", "fast", "medium")

    def __init__(self, preset: str = "medium") -> None:
        if preset not in self.PRESETS:
            raise FusionError(f"flow preset: {preset!r} is not one of {', '.join(self.PRESETS)}")
        cv2 = _import_cv2()
        self._cv2 = cv2
        self._dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}"))

    def __call__(self, first: Tensor, second: Tensor) -> Tensor:
        _check_pair(first, second)
        flow = self._dis.calc(_grey_u8(first), _grey_u8(second), None)  # (H, W, 2) float32
        return torch.from_numpy(flow).permute(2, 0, 1)[None].to(first.device)


class RaftFlow:
    """torchvision's RAFT (Teed and Deng 2020, ``raft_large``) with the weights in ``weights`` (a state dict), on
    ``device``. Frames are padded (their border repeated) to a multiple of 8 px and at least RAFT_MIN_SIDE px, as
    RAFT needs, and the flow cropped back."""

    def __init__(self, weights: str | Path | dict[str, Tensor], device: torch.device | str = "cpu") -> None:
        try:
            from torchvision.models.optical_flow import raft_large
        except ImportError as error:  # an old torchvision
            raise FusionError("flow 'raft': needs torchvision >= 0.12 (torchvision.models.optical_flow)") from error
        state = weights if isinstance(weights, dict) else _read_state(Path(weights))
        model = raft_large(weights=None, progress=False)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise FusionError(f"flow 'raft': {weights} is not a raft_large state dict ({error})") from None
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, first: Tensor, second: Tensor) -> Tensor:
        _check_pair(first, second)
        h, w = first.shape[-2:]
        pad = (0, max(RAFT_MIN_SIDE, w + -w % 8) - w, 0, max(RAFT_MIN_SIDE, h + -h % 8) - h)
        frames = [F.pad(frame.to(self.device) * 2 - 1, pad, mode="replicate") for frame in (first, second)]
        flow = self.model(*frames, num_flow_updates=12)[-1]
        return flow[..., :h, :w].to(first.device)


def flow_estimator(
    name: str,
    *,
    raft_weights: str | Path | None = None,
    models_dirs: Sequence[str | Path] = (),
    download: bool = False,
    device: str = "cpu",
) -> FlowEstimator:
    """The estimator called ``name``: "dis", "raft" or "auto" (DIS where OpenCV imports, else RAFT). RAFT's weights:
    ``raft_weights``, else ``raft_large.safetensors`` in ``models_dirs`` (``weights.find_raft``), downloaded from
    torchvision's server when ``download``; a FusionError says what to install or fetch otherwise."""
    if name not in ("auto", *FLOW_NAMES):
        raise FusionError(f"flow: {name!r} is not one of auto, {', '.join(FLOW_NAMES)}")
    if name == "dis":
        return DISFlow()
    if name == "auto":
        try:
            return DISFlow()
        except FusionError:
            if raft_weights is None and not download and not _has_raft(models_dirs):
                raise FusionError(
                    "flow: no optical flow available: install OpenCV (pip install opencv-python-headless) for DIS "
                    "flow, or give torchvision RAFT's raft_large weights"
                ) from None
    path = raft_weights if raft_weights is not None else find_raft(models_dirs, download=download)
    return RaftFlow(path, device)


def _has_raft(models_dirs: Sequence[str | Path]) -> bool:
    try:
        find_raft(models_dirs, download=False)
    except FusionError:
        return False
    return True


def _import_cv2():
    try:
        import cv2
    except ImportError:
        raise FusionError("flow 'dis': needs OpenCV; install it with: pip install opencv-python-headless") from None
    return cv2


def _grey_u8(frame: Tensor):
    grey = (0.299 * frame[0, 0] + 0.587 * frame[0, 1] + 0.114 * frame[0, 2]).clamp(0, 1)
    return (grey * 255).round().to(torch.uint8).cpu().numpy()


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FusionError(f"flow 'raft': weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".pth", ".pt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a pickle that is not plain tensors
            raise FusionError(f"flow 'raft': {path} could not be read as tensors only ({error})") from None
    raise FusionError(f"flow 'raft': {path}: expected a .safetensors or .pth file")


def _check_pair(first: Tensor, second: Tensor) -> None:
    if first.dim() != 4 or first.shape[:2] != (1, 3) or first.shape != second.shape:
        raise FusionError(
            f"flow: expected two frames of one shape (1, 3, H, W), got {tuple(first.shape)} and {tuple(second.shape)}"
        )
