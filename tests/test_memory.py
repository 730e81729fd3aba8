"""The memory estimate counts each kind of tensor at its size, and the CUDA check counts PyTorch's cached blocks."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import saved_bytes, smooth_image, tiny_vgg

from fusion_core import FusionError, GlobalStyle, LocalStyle, Settings, allocator, memory
from fusion_core.geometry import border_margin, with_margin
from fusion_core.precision import GradientScale, autocast


def kept_by_the_pass(vgg, image, layers, half):
    """What autograd keeps of the VGG pass as the criterion runs it, with a loss that keeps each returned layer as
    the losses see it."""
    scale = GradientScale(enabled=half is not None)

    def run():
        with autocast(image.device, half):
            activations = vgg(scale.unscale_at(image.clone().requires_grad_(True)), layers)
            sum(scale.for_losses(value).square().sum() for value in activations.values())

    return saved_bytes(vgg, run)


@pytest.mark.parametrize("half", [None, torch.float16], ids=["float32", "float16"])
def test_kept_bytes_match_what_the_pass_keeps(half):
    # float16 as CUDA runs it, emulated on the CPU: activations at 2 bytes, the losses' copies at 4.
    shape = (96, 128)
    vgg = tiny_vgg(width=8)
    layers = {"relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"}
    measured = kept_by_the_pass(vgg, smooth_image(*shape, seed=3), layers, half)
    counted = memory.kept_bytes(vgg, shape, layers, half)
    assert counted * 0.95 <= measured <= counted * 1.05, (counted, measured)


def test_mixed_precision_on_cuda_is_estimated_smaller(monkeypatch):
    vgg = tiny_vgg(width=8)
    style = smooth_image(64, 64, seed=2)
    styles = [GlobalStyle(style), LocalStyle(style)]
    full = memory.estimate_bytes(vgg, (1024, 1024), styles, Settings(mixed_precision=False))
    monkeypatch.setattr(memory, "mixed_dtype", lambda device, wanted=True: torch.float16 if wanted else None)
    half = memory.estimate_bytes(vgg, (1024, 1024), styles, Settings())
    assert half < full
    assert memory.estimate_bytes(vgg, (1024, 1024), styles, Settings(mixed_precision=False)) == full


def test_cuda_memory_available_counts_the_cached_blocks(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    # 1 GiB the driver has free, and 4 GiB PyTorch holds for reuse that no tensor occupies
    assert memory.available_bytes(torch.device("cuda")) == 5 * gib


def _mapped_bytes() -> int:
    """What glibc's malloc holds in blocks mapped from the system (``mallinfo2().hblkhd``)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        _fields_ = [(name, ctypes.c_size_t) for name in (*names, "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    return mallinfo2().hblkhd


def _has_mallinfo2() -> bool:
    import ctypes

    return allocator._mallopt() is not None and hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33


@pytest.mark.skipif(not _has_mallinfo2(), reason="not Linux with glibc >= 2.33: the allocator setting does not apply")
def test_in_a_tiled_level_freed_blocks_go_back_to_the_system():
    # In a fresh process: glibc reuses a free heap chunk that fits before it asks the system for memory, and this
    # process's heap holds what earlier tests freed.
    script = f"""
import sys
sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
import torch
from test_memory import _mapped_bytes
from fusion_core import allocator
size = 2 * allocator.RETURNED_BLOCK  # below the 32 MB up to which glibc serves blocks from its heaps
warm = torch.ones((30 << 20) // 4)
del warm  # freeing a mapped block raises glibc's own threshold to its size: as in a process that has been working
with allocator.freed_memory_returned(torch.device("cpu")):
    before = _mapped_bytes()
    block = torch.ones(size // 4)
    assert _mapped_bytes() >= before + size, "not mapped from the system"
    del block
    assert _mapped_bytes() == before, "not unmapped when freed"
before = _mapped_bytes()
block = torch.ones(size // 4)
assert _mapped_bytes() == before, "still mapped after the level"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(allocator._mallopt() is None, reason="not Linux with glibc: there is no heap to trim")
def test_what_the_process_freed_in_its_heaps_counts_as_available_once_trimmed():
    # In a fresh process: blocks below glibc's threshold come from its heaps; freed between blocks still in use,
    # they stay the process's (resident) until malloc_trim, which the level loop runs before it plans a level.
    script = """
import os, sys
sys.path.insert(0, %r)
import torch
from fusion_core import allocator
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
warm = torch.ones((30 << 20) // 4)
del warm  # freeing a mapped block raises glibc's own threshold to its size: 4 MB blocks now come from the heaps
blocks = [torch.ones((4 << 20) // 4) for _ in range(64)]  # 256 MB, touched
del blocks[0::2]  # 128 MB freed between blocks still in use: glibc gives back only what is free at a heap's top
before = resident()
allocator.trim_heaps()
given_back = before - resident()
assert given_back >= 100 << 20, given_back
"""
    done = subprocess.run(
        [sys.executable, "-c", script % str(Path(__file__).parents[1])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_allocator_setting_is_entered_only_where_the_caller_asks_and_is_set_back(monkeypatch):
    """A library call never changes the process's allocator (ComfyUI runs us in its process): ``stylize`` enters
    ``freed_memory_returned`` only around tiled levels, and only when its caller passes it as ``tiled_level``, as
    the command line does."""
    calls = []
    monkeypatch.setattr(allocator, "_mallopt", lambda: lambda option, value: calls.append((option, value)) or 1)
    for device, enabled in (("cuda", True), ("mps", True), ("cpu", False)):
        with allocator.freed_memory_returned(torch.device(device), enabled):
            pass
    assert calls == []
    with pytest.raises(KeyError), allocator.freed_memory_returned(torch.device("cpu")):
        assert calls == [(allocator._M_MMAP_THRESHOLD, allocator.RETURNED_BLOCK)]
        raise KeyError("set back on errors too")
    assert calls[-1] == (allocator._M_MMAP_THRESHOLD, allocator._GLIBC_LARGEST_THRESHOLD)
    calls.clear()
    # nested (the command line's whole run around stylize's tiled levels): set on the outermost entry and set back
    # only when it is left, not when the inner region is
    with allocator.freed_memory_returned(torch.device("cpu")):
        with allocator.freed_memory_returned(torch.device("cpu")):
            pass
        assert calls == [(allocator._M_MMAP_THRESHOLD, allocator.RETURNED_BLOCK)]
    assert calls[-1] == (allocator._M_MMAP_THRESHOLD, allocator._GLIBC_LARGEST_THRESHOLD) and len(calls) == 2
    calls.clear()
    import fusion_core.stylize as stylize_module

    content, style = smooth_image(61, 77, seed=1), smooth_image(54, 83, seed=2)
    styles = [GlobalStyle(style, layers=("relu1_1", "relu2_1", "relu3_1")), LocalStyle(style)]
    for tile in (0, 50):
        # the content on relu3_1: 50 px tiles are too small for relu4_2's receptive field
        settings = Settings(content_layer="relu3_1", final_iterations=0, size=77, levels=2, iterations=1, tile=tile)
        stylize_module.stylize(tiny_vgg(), content, styles, settings)
        assert calls == []  # a library call: never
        stylize_module.stylize(tiny_vgg(), content, styles, settings, tiled_level=allocator.freed_memory_returned)
        assert len(calls) == (4 if tile else 0), calls  # each level in tiles, entered and left
        calls.clear()


def test_a_tiled_plan_counts_the_content_maps_it_holds():
    """The content term's target and the patch search's guide (the content's map on the local layer) are one map
    when both use a layer, two when they do not, and none is kept for a zero weight: the tiled estimate grows by
    exactly the maps' bytes."""
    vgg = tiny_vgg(width=8)
    shape, style = (200, 240), smooth_image(200, 240, seed=2)
    styles = [GlobalStyle(style), LocalStyle(style)]  # the local term on relu3_1

    def estimate(**changes) -> int:
        return memory.tiled_bytes(vgg, shape, styles, Settings(**changes), 192, 5)

    relu3_1 = 4 * vgg.convs[4].out_channels * (shape[0] // 4) * (shape[1] // 4)
    assert estimate(content_layer="relu3_1", match_content=0.5) == estimate(content_layer="relu3_1", match_content=0)
    assert (
        estimate(content_layer="relu4_1", match_content=0.5)
        == estimate(content_layer="relu4_1", match_content=0) + relu3_1
    )
    assert estimate(content_layer="relu3_1", match_content=0) == (
        estimate(content_layer="relu3_1", content_weight=0, match_content=0) + relu3_1
    )


def test_a_memory_budget_leaves_room_for_what_the_process_holds(monkeypatch):
    """``Settings.max_memory``: the plan may use the budget less what the process holds on the device, and no more
    than the device has free."""
    gib = 2**30
    monkeypatch.setattr(memory, "_free_bytes", lambda device: 20 * gib)
    monkeypatch.setattr(memory, "held_bytes", lambda device: gib // 2)
    cpu = torch.device("cpu")
    assert memory.available_bytes(cpu) == 20 * gib
    assert memory.available_bytes(cpu, 3.0) == 3 * gib - gib // 2
    assert memory.available_bytes(cpu, 0.25) == 0  # nothing left: the plans refuse
    monkeypatch.setattr(memory, "_free_bytes", lambda device: gib)
    assert memory.available_bytes(cpu, 3.0) == gib  # the device has less than the budget


def test_plans_fit_the_budget_and_a_budget_too_small_is_refused_with_its_name(monkeypatch):
    vgg = tiny_vgg(width=8)
    style = smooth_image(256, 256, seed=2)
    styles = [GlobalStyle(style), LocalStyle(style)]
    shape = (520, 520)
    monkeypatch.setattr(memory, "held_bytes", lambda device: 0)
    monkeypatch.setattr(memory, "_free_bytes", lambda device: 1 << 40)
    whole = memory.estimate_bytes(vgg, shape, styles, Settings())
    roomy = memory.plan_level(vgg, shape, styles, Settings(max_memory=2 * whole / 2**30))
    assert roomy.tile == 0
    budget = 0.6 * whole / 2**30
    tight = memory.plan_level(vgg, shape, styles, Settings(max_memory=budget))
    assert tight.tile > 0
    assert memory.plan_bytes(vgg, shape, styles, Settings(), tight) <= memory.MARGIN * budget * 2**30
    with pytest.raises(FusionError, match=r"max_memory 0\.001 GB leaves .* or a larger max_memory \(now 0\.001 GB\)"):
        memory.plan_level(vgg, shape, styles, Settings(max_memory=0.001))


def test_a_runs_bytes_are_the_network_and_its_last_level_as_planned():
    vgg = tiny_vgg(width=8)
    style = smooth_image(256, 256, seed=2)
    styles = [GlobalStyle(style), LocalStyle(style)]
    model = sum(t.numel() * t.element_size() for t in vgg.parameters())
    settings = Settings(size=500, levels=3)
    canvas = with_margin((375, 500), border_margin((375, 500)))  # a 600 x 800 content's last level, with its margin
    whole = memory.estimate_bytes(vgg, canvas, styles, settings)
    assert memory.run_bytes(vgg, (600, 800), styles, settings) == model + whole  # no budget: whole, however large
    budget = replace(settings, max_memory=0.6 * whole / 2**30)
    tight = memory.run_bytes(vgg, (600, 800), styles, budget)
    plan = memory.plan_level(vgg, canvas, styles, budget, round(0.6 * whole))
    assert plan.tile > 0 and tight == model + memory.plan_bytes(vgg, canvas, styles, budget, plan) < model + whole
