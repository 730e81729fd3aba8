"""Clips in and out: a video file (PyAV) or a folder of frames, read into host memory as 8-bit frames, and results
written frame by frame as they come (a folder of numbered PNGs, or a video file).

PyAV (``av``, which ComfyUI already ships) is optional: imported only for video files, with a message naming what to
install when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import FusionError
from .images import load_image, save_image, to_pil

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_FPS = 24.0


class Frames(Sequence[Tensor]):
    """Frames held as 8-bit (N, H, W, 3) on the host (a quarter of float32's bytes); each read as (1, 3, H, W)
    float32 in 0..1."""

    def __init__(self, frames: Tensor, fps: float = DEFAULT_FPS) -> None:
        self.frames, self.fps = frames, fps

    def __len__(self) -> int:
        return self.frames.shape[0]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return Frames(self.frames[index], self.fps)
        return self.frames[index].permute(2, 0, 1)[None].float() / 255


def is_clip(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a clip (a folder, or a file with a video extension) rather than one image."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


def read_clip(path: str | os.PathLike, name: str = "content") -> Frames:
    """The frames of a video file or of a folder's images (sorted by name), all of one size."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise FusionError(f"{name}: no images ({', '.join(FRAME_SUFFIXES)}) in the folder {path}")
        frames = [_as_u8(load_image(file, f"{name} {file.name}")) for file in files]
        _check_sizes(name, frames, [file.name for file in files])
        return Frames(torch.stack(frames), DEFAULT_FPS)
    if not path.is_file():
        raise FusionError(f"{name}: file not found: {path}")
    av = _import_av(name)
    try:
        with av.open(str(path)) as container:
            stream = next(iter(container.streams.video), None)
            if stream is None:
                raise FusionError(f"{name}: {path.name} has no video stream")
            fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
            frames = [torch.from_numpy(frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    except FusionError:
        raise
    except Exception as error:  # noqa: BLE001 - PyAV raises its own errors for unreadable files
        raise FusionError(f"{name}: {path.name} is not a readable video ({error})") from None
    if not frames:
        raise FusionError(f"{name}: {path.name} has no frames")
    _check_sizes(name, frames, [f"frame {i}" for i in range(len(frames))])
    return Frames(torch.stack(frames), fps)


class ClipWriter:
    """Writes frames as they come: into a folder as frame_00001.png, ... (each file atomically), or into a video
    file, encoded at ``fps``, written to a temporary name and moved into place by ``close`` (also after a cancel, so
    the frames made so far are kept)."""

    def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> None:
        self.path, self.fps, self.count = check_clip_output(path), fps, 0
        self._container = self._stream = self._av = None
        if self.path.suffix:
            self._av = _import_av("out")
            self._temporary = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        else:
            self.path.mkdir(parents=True, exist_ok=True)

    def write(self, image: Tensor) -> None:
        self.count += 1
        if self._av is None:
            save_image(image, self.path / f"frame_{self.count:05d}.png")
            return
        picture = np.asarray(to_pil(image))
        if self._container is None:
            self._container = self._av.open(str(self._temporary), mode="w")
            codec = "libvpx-vp9" if self.path.suffix.lower() == ".webm" else "libx264"
            self._stream = self._container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.height, self._stream.width = picture.shape[0] // 2 * 2, picture.shape[1] // 2 * 2
            self._stream.pix_fmt = "yuv420p"
        picture = picture[: self._stream.height, : self._stream.width]  # yuv420p needs even sides
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Finish the file: a video's last packets written and the file moved into place."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._temporary, self.path)


def check_clip_output(path: str | os.PathLike) -> Path:
    """Refuse a clip's output we could not write, before any work: a folder (made if missing) or a video file in an
    existing folder, with PyAV at hand."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES and suffix != ".gif":
        if not path.parent.is_dir():
            raise FusionError(f"out: folder does not exist: {path.parent}")
        _import_av("out")
    elif suffix:
        raise FusionError(
            f"out: for a clip give a folder (frames as numbered PNGs) or a video file "
            f"({', '.join(s for s in VIDEO_SUFFIXES if s != '.gif')}), not {path.name}"
        )
    return path


def _as_u8(image: Tensor) -> Tensor:
    return (image[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)


def _check_sizes(name: str, frames: list[Tensor], labels: list[str]) -> None:
    first = tuple(frames[0].shape[:2])
    for frame, label in zip(frames, labels, strict=True):
        if tuple(frame.shape[:2]) != first:
            raise FusionError(
                f"{name}: {label} is {frame.shape[1]}x{frame.shape[0]} px, the first frame {first[1]}x{first[0]} px: "
                "every frame of a clip must have one size"
            )


def _import_av(name: str):
    try:
        import av
    except ImportError:
        message = f"{name}: video files need PyAV; install it with: pip install av (ComfyUI ships it)"
        raise FusionError(message) from None
    return av
