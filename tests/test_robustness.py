"""Bad input the earlier test files do not cover: memory, masks, imports."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_vgg

from fusion_core import FusionError, GlobalStyle, LocalStyle, Settings
from fusion_core.images import resize_mask
from fusion_core.memory import MIN_TILE, estimate_bytes, plan_level, tiled_bytes
from fusion_core.stylize import stylize

ROOT = Path(__file__).resolve().parents[1]


def test_memory_estimate_grows_with_the_area(style):
    vgg = tiny_vgg("vgg19", width=64)  # real widths: the estimate depends on them
    styles = [GlobalStyle(style), LocalStyle(style)]
    small = estimate_bytes(vgg, (512, 512), styles, Settings())
    large = estimate_bytes(vgg, (1024, 1024), styles, Settings())
    assert 3.5 < large / small < 4.5
    assert estimate_bytes(vgg, (1024, 1024), styles, Settings(optimizer="adam")) < large


def test_a_run_that_cannot_fit_even_in_tiles_is_refused_with_the_estimate_and_a_size_that_fits(vgg, style):
    styles = [GlobalStyle(style), LocalStyle(style)]
    settings = Settings(size=4096)
    needed = tiled_bytes(vgg, (4096, 4096), styles, settings, MIN_TILE, 1)
    with pytest.raises(
        FusionError,
        match=r"size: an output of 4096x4096 px needs about .* GiB even in tiles of \d+ px, but only .* GiB is free"
        r".*about \d+ px would fit",
    ):
        plan_level(vgg, (4096, 4096), styles, settings, available=needed // 2)
    whole = estimate_bytes(vgg, (4096, 4096), styles, settings)
    assert plan_level(vgg, (4096, 4096), styles, settings, available=whole * 2).tile == 0  # fits whole
    assert plan_level(vgg, (4096, 4096), styles, settings, available=whole // 2).tile > 0  # fits in tiles


def test_huge_request_is_refused_before_any_work(vgg, content, style, monkeypatch):
    monkeypatch.setattr("fusion_core.memory.available_bytes", lambda device, max_memory=0: 64 * 2**20)
    calls = []
    monkeypatch.setattr(type(vgg), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(FusionError, match="needs about"):
        stylize(vgg, content, [GlobalStyle(style)], Settings(size=3000))
    assert calls == []


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.zeros(8, 8), "target_mask: the mask is empty"),
        (torch.full((8, 8), float("nan")), "target_mask: the mask contains NaN"),
        (torch.ones(2, 8, 8), r"target_mask: expected one mask of shape \(H, W\), got shape \(2, 8, 8\)"),
    ],
)
def test_bad_masks(vgg, content, style, mask, message):
    with pytest.raises(FusionError, match=message):
        stylize(vgg, content, [GlobalStyle(style, target_mask=mask)], Settings(size=48, levels=1))


def test_a_mask_of_another_size_or_range_is_the_mask_clamped_and_resized_to_the_output(vgg, content, style):
    mask = torch.full((1, 13, 29), 3.0)  # batch of one, wrong size, values above 1 ...
    mask[..., :10] = -1.0  # ... and below 0
    settings = Settings(final_iterations=0, size=64, levels=1, iterations=2)  # one level at the content's own 48x64

    def run(target_mask):
        return stylize(vgg, content, [GlobalStyle(style, target_mask=target_mask), LocalStyle(style)], settings)

    out = run(mask)
    # The same as clamping it to 0..1 and stretching it to the output's size by area (resize_mask) beforehand ...
    torch.testing.assert_close(out, run(resize_mask(mask[0].clamp(0, 1), (48, 64))))
    # ... and the mask counts: without it the global style applies everywhere.
    assert (out - run(None)).abs().max() > 1e-3


def test_patch_size_larger_than_the_feature_map(vgg, content, style):
    with pytest.raises(FusionError, match="too small for relu3_1 with 15x15 patches"):
        stylize(vgg, content, [LocalStyle(style, patch_size=15)], Settings(size=48, levels=1))


def test_import_does_no_network_access_and_no_heavy_work():
    code = (
        "import socket, sys, time\n"
        "def refuse(*a, **k): raise RuntimeError('network access at import')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
        "import torch\nstart = time.perf_counter()\n"
        "import fusion_core, fusion_core.cli\n"
        "assert time.perf_counter() - start < 5, 'slow import'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
