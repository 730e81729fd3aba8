"""The memory estimate counts each kind of tensor at its size, and the CUDA check counts PyTorch's cached blocks."""

import pytest
import torch
from helpers import saved_bytes, smooth_image, tiny_vgg

from fusion_core import GlobalStyle, LocalStyle, Settings, memory
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
