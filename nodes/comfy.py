"""Every contact with ComfyUI, in one module: device, memory, progress bar, cancel, the models/vgg folder.

ComfyUI's modules are imported inside each function, never at import time, so the pack imports without
ComfyUI (tests, scripts) and a test can fake any of them with ``patch.dict(sys.modules, {...})``.
Without ComfyUI every function falls back to plain behaviour: CPU, no progress bar, never cancelled,
and weights in ``fallback_models_dir`` (the CLI's folder unless a test points it elsewhere).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import torch
from PIL import Image

from ..fusion_core.errors import Cancelled
from ..fusion_core.weights import WEIGHT_SUFFIXES, default_models_dir

MODELS_FOLDER = "vgg"  # models/vgg, as folder_paths names it
FALLBACK_PREVIEW_SIZE = 512  # ComfyUI's --preview-size default

fallback_models_dir: Path | None = None  # None: fusion_core's default (~/.cache/fusion-style)

ProgressUpdate = Callable[[int, Image.Image | None], None]  # (steps done, preview image or None)


def _module(name: str) -> ModuleType | None:
    """The ComfyUI module ``name``, or None when not running inside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# --- device and memory ---------------------------------------------------------------------------


def log(message: str) -> None:
    """A line in ComfyUI's console (its logging shows INFO)."""
    logging.getLogger("fusion_style").info(message)


def torch_device() -> torch.device:
    """The device ComfyUI computes on (``--cpu`` makes it the CPU)."""
    mm = _module("comfy.model_management")
    return mm.get_torch_device() if mm else torch.device("cpu")


def offload_device() -> torch.device:
    """Where an idle model waits: the CPU, unless ComfyUI keeps models on the GPU (--highvram, --gpu-only)."""
    mm = _module("comfy.model_management")
    return mm.unet_offload_device() if mm else torch.device("cpu")


def free_memory(num_bytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models until ``num_bytes`` are free on ``device``."""
    mm = _module("comfy.model_management")
    if mm:
        mm.free_memory(num_bytes, device)


def soft_empty_cache() -> None:
    mm = _module("comfy.model_management")
    if mm:
        mm.soft_empty_cache()


# --- cancel ----------------------------------------------------------------------------------------


def should_stop() -> bool:
    """True once the user has cancelled the running prompt."""
    mm = _module("comfy.model_management")
    return bool(mm and mm.processing_interrupted())


def raise_interrupted(error: Cancelled) -> NoReturn:
    """Turn fusion_core's ``Cancelled`` into ComfyUI's own interrupt exception (which also clears the flag)."""
    mm = _module("comfy.model_management")
    if mm:
        mm.throw_exception_if_processing_interrupted()
    raise error


# --- progress --------------------------------------------------------------------------------------


def progress_bar(total: int) -> ProgressUpdate:
    """A function ``update(done, preview)`` driving ComfyUI's progress bar (and its live preview image)."""
    utils = _module("comfy.utils")
    if utils is None:
        return lambda done, preview=None: None
    bar = utils.ProgressBar(total)
    cap = preview_size()

    def update(done: int, preview: Image.Image | None = None) -> None:
        bar.update_absolute(done, total, None if preview is None else ("JPEG", preview, preview_max_size(preview, cap)))

    return update


def preview_max_size(preview: Image.Image, cap: int) -> int:
    """The max_size of a preview tuple that shows ``preview`` at its own size, or smaller to fit ``cap``.

    ComfyUI's server fits every preview into max_size x max_size with ``ImageOps.contain``, which also enlarges
    (server.py ``send_image`` / ``send_image_with_metadata``): a 128 px level sent with the --preview-size (512)
    came out as a blurred 512 px picture labelled with the wrong size.
    """
    return min(max(preview.size), cap)


def download_progress() -> Callable[[int, int | None], None] | None:
    """A byte-count callback for fusion_core's download of the VGG19 weights, shown on the progress bar."""
    utils = _module("comfy.utils")
    if utils is None:
        return None
    bar = None

    def report(done: int, total: int | None) -> None:
        nonlocal bar
        total = total or max(done, 1)  # no Content-Length: a bar that is always full
        if bar is None:
            bar = utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return report


def preview_size() -> int:
    cli_args = _module("comfy.cli_args")
    return getattr(getattr(cli_args, "args", None), "preview_size", None) or FALLBACK_PREVIEW_SIZE


# --- the models/vgg folder ---------------------------------------------------------------------------


def register_models_folder() -> None:
    """Add ``<ComfyUI>/models/vgg`` to the "vgg" model folder, after any extra_model_paths.yaml entries."""
    fp = _module("folder_paths")
    if fp is None:
        return
    fp.add_model_folder_path(MODELS_FOLDER, os.path.join(fp.models_dir, MODELS_FOLDER))
    extensions = fp.folder_names_and_paths[MODELS_FOLDER][1]
    if isinstance(extensions, set) and not extensions:  # a new entry lists every file; only weights please
        extensions.update(WEIGHT_SUFFIXES)


def models_dirs() -> list[str]:
    """The vgg model folders, in search order; fusion_core downloads named weights into the first."""
    fp = _module("folder_paths")
    if fp is None:
        return [str(fallback_models_dir or default_models_dir())]
    if MODELS_FOLDER not in fp.folder_names_and_paths:  # the pack was loaded without its __init__ registering it
        register_models_folder()
    return fp.get_folder_paths(MODELS_FOLDER)


def weights_files() -> list[str]:
    """Names of the weights files in the vgg model folders (relative paths, as ComfyUI lists them)."""
    fp = _module("folder_paths")
    if fp is not None:
        return fp.get_filename_list(MODELS_FOLDER)
    folder = Path(models_dirs()[0])
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)


def weights_path(name: str) -> str | None:
    """Full path of the weights file ``name`` from ``weights_files()``, or None if it is not there."""
    fp = _module("folder_paths")
    if fp is not None:
        return fp.get_full_path(MODELS_FOLDER, name)
    path = Path(models_dirs()[0]) / name
    return str(path) if path.is_file() else None
