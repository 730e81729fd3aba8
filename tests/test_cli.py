"""The command line: writes the image, reports progress, fails with one line on bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import smooth_image, tiny_vgg, write_tiny_vgg
from PIL import Image

from fusion_core import GlobalStyle, LocalStyle, Settings, cli
from fusion_core.cli import main
from fusion_core.images import to_pil
from fusion_core.stylize import stylize

PAPER_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_2")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    write_tiny_vgg(folder / "tiny.safetensors", arch="vgg16")
    for name, seed, size in (("content.png", 1, (40, 56)), ("style.png", 2, (48, 48)), ("style2.png", 3, (48, 48))):
        array = (smooth_image(*size, seed=seed)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / name)
    mask = np.zeros((40, 56), np.uint8)
    mask[:, 28:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def run(files, *extra):
    base = [
        "--content",
        str(files / "content.png"),
        "--weights",
        str(files / "tiny.safetensors"),
        "--size",
        "48",
        "--levels",
        "2",
        "--iters",
        "3",
    ]
    return main([*base, *extra])


def test_writes_the_stylised_image_and_shows_progress(files, capsys):
    out = files / "out.png"
    assert run(files, "--style", str(files / "style.png"), "--out", str(out)) == 0
    assert Image.open(out).size == (48, 34)
    err = capsys.readouterr().err
    assert "level 2/2" in err and "global" in err and "local" in err and f"wrote {out}" in err


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as (1, 3, H, W) in 0..1, read with PIL alone."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def test_several_styles_masks_and_controls_give_the_library_result(files):
    out = files / "out2.png"
    args = [
        "--style",
        str(files / "style.png"),
        "--style",
        str(files / "style2.png"),
        "--blend",
        "0.7",
        "0.3",
        "--mask",
        str(files / "mask.png"),
        "--mask",
        str(files / "mask.png"),
        "--color",
        "luminance",
        "--optimizer",
        "adam",
        "--tv-weight",
        "1",
        "--style-scale",
        "0.8",
        "--save-every",
        "2",
        "--matcher",
        "exact",
        "--rematch-every",
        "2",
        "--final-iters",
        "0",
        "--device",  # the library call below runs on the CPU; "auto" would take a GPU where there is one
        "cpu",
        "--quiet",
    ]
    assert run(files, *args, "--out", str(out)) == 0
    # The same run written out by hand against the library: a Global + Local term per style with its blend weight
    # (the library shares the weights out by them) and limited to its mask (the white right half), and the flags as
    # Settings.
    mask = torch.zeros(40, 56)
    mask[:, 28:] = 1
    terms = []
    for name, blend in (("style.png", 0.7), ("style2.png", 0.3)):
        style = read_rgb(files / name)
        terms += [
            GlobalStyle(style, target_mask=mask, scale=0.8, blend=blend),  # the default weights
            LocalStyle(style, target_mask=mask, scale=0.8, blend=blend),
        ]
    settings = Settings(
        size=48,
        levels=2,
        iterations=3,
        final_iterations=0,
        color="luminance",
        optimizer="adam",
        tv_weight=1.0,
        matcher="exact",
        rematch_every=2,
    )
    expected = np.asarray(to_pil(stylize(tiny_vgg("vgg16"), read_rgb(files / "content.png"), terms, settings)))
    written = np.asarray(Image.open(out))
    assert written.shape == expected.shape == (34, 48, 3)
    # The same image, up to 8-bit rounding. (Each flag changes this image by more, but the matcher: at this size
    # fast and exact differ by one level at most, so the test below checks that flag on its own.)
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


def test_matcher_flags_reach_the_settings(files, fake_stylize):
    captured = fake_stylize(cli)
    style, out = str(files / "style.png"), str(files / "matcher.png")
    assert run(files, "--style", style, "--out", out, "--quiet", "--matcher", "exact", "--rematch-every", "4") == 0
    assert (captured[0].matcher, captured[0].rematch_every) == ("exact", 4)


def test_tile_and_final_iterations_flags_reach_the_settings(files, fake_stylize):
    captured = fake_stylize(cli)
    out = str(files / "tiled.png")
    assert (
        run(files, "--style", str(files / "style.png"), "--out", out, "--quiet", "--tile", "1024", "--final-iters", "7")
        == 0
    )
    assert (captured[0].tile, captured[0].final_iterations) == (1024, 7)
    assert run(files, "--style", str(files / "style.png"), "--out", out, "--quiet") == 0
    assert (captured[1].tile, captured[1].final_iterations) == (0, Settings().final_iterations)  # tiles: automatic


def test_with_a_memory_budget_the_whole_run_returns_freed_blocks(files, monkeypatch):
    """--max-memory promises resident memory: the command line (which owns its process) has the C allocator give
    freed blocks back for the whole run, not only around levels in tiles, and sets the allocator back after it."""
    from fusion_core import allocator

    calls, during = [], []
    monkeypatch.setattr(allocator, "_mallopt", lambda: lambda option, value: calls.append((option, value)) or 1)

    def recording_stylize(*args, **kwargs):
        during.append(list(calls))
        return stylize(*args, **kwargs)

    monkeypatch.setattr(cli, "stylize", recording_stylize)
    out, style = str(files / "budget.png"), str(files / "style.png")
    assert run(files, "--style", style, "--out", out, "--quiet") == 0
    assert during == [[]] and calls == []  # no budget, no level in tiles: the allocator untouched
    assert run(files, "--style", style, "--out", out, "--quiet", "--max-memory", "16") == 0
    assert during[1] == [(allocator._M_MMAP_THRESHOLD, allocator.RETURNED_BLOCK)]  # set before the first level
    assert calls == [
        (allocator._M_MMAP_THRESHOLD, allocator.RETURNED_BLOCK),
        (allocator._M_MMAP_THRESHOLD, allocator._GLIBC_LARGEST_THRESHOLD),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--style", "missing.png", "--out", "o.png"], "style missing.png: file not found"),
        (["--style", "{style}", "--out", "o.gif"], "out: unsupported image extension '.gif'"),
        (["--style", "{style}", "--out", "o.png", "--iters", "0"], "iterations: expected a whole number >= 1"),
        (["--style", "{style}", "--out", "o.png", "--blend", "1", "2"], "blend: give 1 weight"),
        (["--style", "{style}", "--out", "o.png", "--device", "cuda:x"], "device: 'cuda:x' is not a device"),
        (["--style", "{style}", "--out", "o.png", "--tile", "-1"], "tile: expected a whole number >= 0, got -1"),
    ],
)
def test_bad_input_exits_2_with_one_line(files, capsys, monkeypatch, args, message):
    monkeypatch.chdir(files)
    args = [a.replace("{style}", str(files / "style.png")) for a in args]
    assert run(files, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusion-style: error: ") and message in err and "\n" not in err
    assert not (files / "o.png").exists()


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fusion_core", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "--local-weight" in result.stdout


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-mixed-precision"], False)])
def test_mixed_precision_flag_reaches_the_settings(files, fake_stylize, flag, expected):
    captured = fake_stylize(cli)
    assert run(files, "--style", str(files / "style.png"), "--out", str(files / "o.png"), "--quiet", *flag) == 0
    assert captured[0].mixed_precision is expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], ("recolored", 10.0, False, None)),
        (["--preset", "paper"], ("random", 0.0, True, PAPER_LAYERS)),
        (["--preset", "paper", "--init", "content", "--tv-weight", "5"], ("content", 5.0, True, PAPER_LAYERS)),
        (["--init", "random"], ("random", 10.0, False, None)),
    ],
)
def test_preset_and_explicit_flags_reach_the_settings(files, fake_stylize, flags, expected):
    captured = fake_stylize(cli)
    assert run(files, "--style", str(files / "style.png"), "--out", str(files / "o.png"), "--quiet", *flags) == 0
    s = captured[0]
    assert (s.init, s.tv_weight, s.local_all_levels, s.global_layers) == expected


@pytest.mark.parametrize(
    ("field", "flags", "expected"),
    [
        ("match_content", [], Settings().match_content),
        ("match_content", ["--match-content", "0.8"], 0.8),
        ("match_content", ["--preset", "paper"], 0.0),
        ("match_content", ["--preset", "paper", "--match-content", "0.25"], 0.25),
        ("match_metric", [], "distance"),
        ("match_metric", ["--match-metric", "correlation"], "correlation"),
        ("match_metric", ["--preset", "paper"], "correlation"),
        ("match_metric", ["--preset", "paper", "--match-metric", "distance"], "distance"),
        ("content_layer", [], "relu4_2"),
        ("content_layer", ["--content-layer", "relu3_1"], "relu3_1"),
        ("content_layer", ["--preset", "paper"], "relu3_1"),
        ("content_layer", ["--preset", "paper", "--content-layer", "relu5_1"], "relu5_1"),
    ],
)
def test_a_settings_flag_reaches_the_settings_and_the_paper_preset_sets_its_own(
    files, fake_stylize, field, flags, expected
):
    captured = fake_stylize(cli)
    assert run(files, "--style", str(files / "style.png"), "--out", str(files / "o.png"), "--quiet", *flags) == 0
    assert getattr(captured[0], field) == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (20.0, 2.5e-5, 10.0, 30)),
        (["--preset", "paper"], (20.0, 1e-4, 20.0, 0)),  # the paper's a1, a2, a3; every level alike
        (["--preset", "paper", "--local-weight", "3e-4", "--content-weight", "7"], (20.0, 3e-4, 7.0, 0)),
        (["--global-weight", "40", "--final-iters", "0"], (40.0, 2.5e-5, 10.0, 0)),
    ],
)
def test_the_paper_preset_sets_the_weights_and_schedule_not_given(files, fake_stylize, flags, expected):
    captured = fake_stylize(cli)
    assert run(files, "--style", str(files / "style.png"), "--out", str(files / "o.png"), "--quiet", *flags) == 0
    (global_term, local_term), s = captured.styles[0], captured[0]
    assert (global_term.weight, local_term.weight, s.content_weight, s.final_iterations) == expected
