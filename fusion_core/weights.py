"""VGG weights: finding, reading, parsing (state dict -> network), verifying and downloading.

Files are read as data only: safetensors, or ``torch.load(weights_only=True)`` for ``.pth``/``.pt``,
which refuses pickles that would construct arbitrary objects. Every file we write is written to a
temporary name beside its destination and renamed into place once complete and verified, so an
interrupted or corrupt download never leaves anything that looks like a model.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import FusionError
from .vgg import BLOCKS, VGGFeatures

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_SHA256 = "dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44"
VGG19_FILENAME = "vgg19.safetensors"  # the features-only copy kept after download
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# torchvision's RAFT (raft_large, C+T+S+K+H, v2) for the optical flow of clips (flow.py); torchvision checks its
# downloads by the SHA-256 prefix in the file name, and so do we
RAFT_URL = "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth"
RAFT_SHA256_PREFIX = "ff5fadd5"
RAFT_FILENAME = "raft_large.safetensors"

DownloadProgress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def torchvision_conv_indices(arch: str) -> list[int]:
    """Indices of the conv layers in torchvision's ``vgg*.features`` (conv, relu, ..., pool)."""
    indices, i = [], 0
    for n_convs in BLOCKS[arch]:
        for _ in range(n_convs):
            indices.append(i)
            i += 2  # conv, relu
        i += 1  # pool
    return indices


def vgg_from_state_dict(
    state: Mapping[str, Tensor],
    *,
    convention: str = "torchvision",
    pooling: str = "max",
) -> VGGFeatures:
    """Build the trunk from a torchvision-style state dict (full or features-only)."""
    features: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        name = key.removeprefix("module.").removeprefix("features.")
        if "running_mean" in name or "num_batches_tracked" in name:
            raise FusionError("weights: batch-norm VGG (vgg*_bn) is not supported; use plain VGG16/VGG19 weights")
        index, _, param = name.partition(".")
        if not index.isdigit() or param not in ("weight", "bias"):
            raise FusionError(
                f"weights: unexpected key {key!r}; expected torchvision VGG16/VGG19 keys 'features.N.weight/bias'"
            )
        features[name] = value
    indices = sorted({int(k.split(".")[0]) for k in features})
    arch = {13: "vgg16", 16: "vgg19"}.get(len(indices))
    if arch is None or indices != torchvision_conv_indices(arch):
        raise FusionError(
            f"weights: found {len(indices)} conv layers at features indices {indices[:20]}; "
            "expected torchvision VGG16 (13 convs) or VGG19 (16 convs)"
        )
    convs = []
    in_channels = 3
    for i in indices:
        weight, bias = features.get(f"{i}.weight"), features.get(f"{i}.bias")
        if weight is None or bias is None:
            raise FusionError(f"weights: conv features.{i} lacks its weight or bias")
        if weight.ndim != 4 or weight.shape[1:] != (in_channels, 3, 3) or bias.shape != weight.shape[:1]:
            raise FusionError(
                f"weights: features.{i}.weight has shape {tuple(weight.shape)}, expected (out, {in_channels}, 3, 3)"
            )
        convs.append((weight.float(), bias.float()))
        in_channels = weight.shape[0]
    return VGGFeatures(convs, convention=convention, pooling=pooling)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a weights file as plain tensors; returns (state dict, safetensors metadata or {})."""
    path = Path(path)
    if not path.is_file():
        raise FusionError(f"weights: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except Exception as error:  # safetensors raises its own error types; any failure means unreadable
            raise FusionError(f"weights: {path.name} is not a readable safetensors file ({error})") from None
        return state, metadata
    if suffix in (".pth", ".pt"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported content"
            raise FusionError(
                f"weights: {path.name} was refused: it holds more than plain tensors and loading it could run code "
                f"({first_line}). Only state dicts of tensors are loaded; prefer .safetensors."
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
            raise FusionError(
                f"weights: {path.name} is truncated or corrupt ({type(error).__name__}: {error})"
            ) from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise FusionError(f"weights: {path.name} does not hold a state dict of tensors")
        return dict(obj), {}
    raise FusionError(f"weights: {path.name} has an unsupported extension; accepted: {', '.join(WEIGHT_SUFFIXES)}")


def convention_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """'caffe' or 'torchvision' if the file says so (``convention`` metadata key), else None."""
    text = metadata.get("convention", "").strip().lower()
    for convention in ("caffe", "torchvision"):
        if text.startswith(convention):
            return convention
    return None


def load_vgg(
    weights: str | os.PathLike,
    *,
    convention: str = "auto",
    pooling: str = "max",
    models_dirs: Iterable[str | os.PathLike] = (),
    download: bool = True,
    progress: DownloadProgress | None = None,
) -> VGGFeatures:
    """Load a VGG16/VGG19 feature extractor.

    ``weights`` is a file path, or ``"vgg19"``: the official torchvision weights, looked up in
    ``models_dirs`` and otherwise downloaded into the first of them (or the user cache folder).
    ``convention`` is ``"auto"`` (the file's metadata, else torchvision), ``"torchvision"`` or ``"caffe"``.
    """
    path = find_weights(weights, models_dirs, download=download, progress=progress)
    state, metadata = read_state_dict(path)
    if convention == "auto":
        convention = convention_from_metadata(metadata) or "torchvision"
    return vgg_from_state_dict(state, convention=convention, pooling=pooling)


def default_models_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fusion-style"


def find_weights(
    weights: str | os.PathLike,
    models_dirs: Iterable[str | os.PathLike] = (),
    *,
    download: bool = True,
    progress: DownloadProgress | None = None,
) -> Path:
    """Resolve a path or the name ``vgg19`` to an existing weights file."""
    if str(weights) != "vgg19":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FusionError(f"weights: file not found: {path} (give a .safetensors/.pth file or the name 'vgg19')")
        return path
    dirs, found = _first_found(models_dirs, (VGG19_FILENAME, Path(VGG19_URL).name))
    if found is not None:
        return found
    if not download:
        raise FusionError(f"weights: vgg19 not found; put {VGG19_FILENAME} or {Path(VGG19_URL).name} in {dirs[0]}")
    return download_vgg19(dirs[0], progress=progress)


def _first_found(models_dirs: Iterable[str | os.PathLike], names: Iterable[str]) -> tuple[list[Path], Path | None]:
    """The folders searched (``models_dirs``, else the default one) and the first of ``names`` found in them."""
    dirs = [Path(d).expanduser() for d in models_dirs] or [default_models_dir()]
    for folder in dirs:
        for name in names:
            if (folder / name).is_file():
                return dirs, folder / name
    return dirs, None


def download_vgg19(
    folder: str | os.PathLike,
    *,
    url: str = VGG19_URL,
    sha256: str = VGG19_SHA256,
    progress: DownloadProgress | None = None,
) -> Path:
    """Download the torchvision VGG19 checkpoint, verify it, keep a features-only safetensors copy.

    The 548 MB checkpoint is streamed to a temporary file and hashed on the way; only when the
    SHA-256 matches are its ``features.*`` tensors written (atomically) as ``vgg19.safetensors``.
    """
    folder = Path(folder)
    with _downloaded(url, folder, progress, VGG19_FILENAME) as (tmp, digest):
        if digest != sha256.lower():
            raise FusionError(
                f"weights: the download from {url} has SHA-256 {digest}, expected {sha256}; the file was deleted"
            )
        state, _ = _read_pth_for_conversion(tmp)
        features = {k: v.float().contiguous() for k, v in state.items() if k.startswith("features.")}
        vgg_from_state_dict(features)  # refuse to keep anything that is not a VGG
        target = folder / VGG19_FILENAME
        save_safetensors_atomic(features, target, {"arch": "vgg19", "convention": "torchvision", "source": url})
        return target


@contextmanager
def _downloaded(url: str, folder: Path, progress: DownloadProgress | None, kept: str) -> Iterator[tuple[Path, str]]:
    """``url`` streamed into a temporary file in ``folder`` (made if missing): (its path, its SHA-256), the file
    deleted when the block ends, whatever happens in it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, progress, folder, kept)
        yield Path(tmp_name), digest
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def find_raft(
    models_dirs: Iterable[str | os.PathLike] = (), *, download: bool = True, progress: DownloadProgress | None = None
) -> Path:
    """torchvision's RAFT (raft_large) weights for the optical flow (flow.py): ``raft_large.safetensors`` (or the
    checkpoint) in the first of ``models_dirs`` that has it, else downloaded into the first, verified and converted
    (``download_raft``)."""
    dirs, found = _first_found(models_dirs, (RAFT_FILENAME, Path(RAFT_URL).name))
    if found is not None:
        return found
    if not download:
        raise FusionError(f"flow 'raft': weights not found; put {RAFT_FILENAME} or {Path(RAFT_URL).name} in {dirs[0]}")
    return download_raft(dirs[0], progress=progress)


def download_raft(
    folder: str | os.PathLike,
    *,
    url: str = RAFT_URL,
    sha256_prefix: str = RAFT_SHA256_PREFIX,
    progress: DownloadProgress | None = None,
) -> Path:
    """Download torchvision's raft_large checkpoint, check it as torchvision does (the SHA-256 starts with the
    hash in the file's name), read it as tensors only and keep it as ``raft_large.safetensors``."""
    folder = Path(folder)
    with _downloaded(url, folder, progress, RAFT_FILENAME) as (tmp, digest):
        if not digest.startswith(sha256_prefix.lower()):
            raise FusionError(
                f"flow 'raft': the download from {url} has SHA-256 {digest}, expected one starting {sha256_prefix}; "
                "the file was deleted"
            )
        state, _ = _read_pth_for_conversion(tmp)
        target = folder / RAFT_FILENAME
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_safetensors_atomic(tensors, target, {"arch": "raft_large", "source": url})
        return target


def _read_pth_for_conversion(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    # read_state_dict dispatches on the suffix; the temporary file has none it knows.
    link = path.with_suffix(".pth")
    os.replace(path, link)
    try:
        return read_state_dict(link)
    finally:
        os.replace(link, path)


def _stream(
    url: str, out, progress: DownloadProgress | None, folder: Path, kept: str = VGG19_FILENAME, chunk: int = 1 << 20
) -> str:
    """Copy ``url`` into ``out``; return the SHA-256 hex digest of what was written."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (https or file URL by design)
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            while block := response.read(chunk):
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
            if total is not None and done != total:
                raise FusionError(f"weights: download from {url} ended early ({done} of {total} bytes)")
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise FusionError(
            f"weights: could not download {url} ({error}). Without network access, download it elsewhere and put it "
            f"(or a converted {kept}) in {folder}"
        ) from None
    return digest.hexdigest()


def save_safetensors_atomic(state: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(state), tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
