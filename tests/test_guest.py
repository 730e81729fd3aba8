"""A good guest in its host's process (ComfyUI runs the pack in its own): a run leaves the process-wide settings as
it found them, sets them once, and changes nothing of the caller's network but what autograd needs."""

from __future__ import annotations

import pytest
import torch
from helpers import smooth_image, tiny_vgg

from fusion_core import GlobalStyle, LocalStyle, Settings, allocator, precision
from fusion_core.stylize import stylize

FAST = dict(size=48, levels=2, iterations=3, final_iterations=0)


@pytest.fixture
def images():
    return smooth_image(40, 48, seed=1), smooth_image(48, 48, seed=2)


class Switch:
    """A stand-in for one of torch's TF32 switches that records every write."""

    def __init__(self, value: object, writes: list) -> None:
        object.__setattr__(self, "writes", writes)
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: object) -> None:
        self.writes.append(value)
        object.__setattr__(self, name, value)


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_a_run_sets_the_tf32_switches_once_and_leaves_them_as_it_found_them(images, monkeypatch, mixed_precision):
    """As if on CUDA: the host's TF32 choice is set aside for the run, once, however deeply the run's regions nest,
    and is what the host set again afterwards. In 16 bits the convolutions' switch is the host's throughout."""
    monkeypatch.setattr(precision, "_cuda_present", lambda: True)
    monkeypatch.setattr(precision, "native_bfloat16", lambda: mixed_precision)  # the 16-bit pass on this CPU too
    matmul_writes, conv_writes = [], []
    matmul, conv = Switch("tf32", matmul_writes), Switch("tf32", conv_writes)
    monkeypatch.setattr(precision, "_tf32_switches", lambda: [(matmul, "value", "ieee"), (conv, "value", "ieee")])
    during = []
    content, style = images
    stylize(
        tiny_vgg(),
        content,
        [GlobalStyle(style), LocalStyle(style)],
        Settings(**FAST, mixed_precision=mixed_precision),
        on_progress=lambda p: during.append((matmul.value, conv.value)),
    )
    assert (matmul.value, conv.value) == ("tf32", "tf32")
    assert set(during) == {("ieee", "tf32" if mixed_precision else "ieee")}
    assert matmul_writes == ["ieee", "tf32"]  # once on entering, once back on leaving
    assert conv_writes == ([] if mixed_precision else ["ieee", "tf32"])


def test_a_run_leaves_torchs_own_switches_as_the_host_set_them(images, monkeypatch):
    monkeypatch.setattr(precision, "_cuda_present", lambda: True)
    switches = precision._tf32_switches()
    saved = [getattr(owner, name) for owner, name, _ in switches]
    host = ["tf32" if isinstance(value, str) else True for _, _, value in switches]
    try:
        for (owner, name, _), value in zip(switches, host, strict=True):
            setattr(owner, name, value)
        content, style = images
        stylize(tiny_vgg(), content, [GlobalStyle(style)], Settings(**FAST, mixed_precision=False))
        assert [getattr(owner, name) for owner, name, _ in switches] == host
    finally:
        for (owner, name, _), value in zip(switches, saved, strict=True):
            if value is not None:
                setattr(owner, name, value)


def test_a_library_run_never_touches_the_allocator(images, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_mallopt", lambda: lambda option, value: calls.append((option, value)) or 1)
    content, style = images
    stylize(tiny_vgg(), content, [GlobalStyle(style), LocalStyle(style)], Settings(**FAST, tile=64))
    assert calls == []


def test_the_callers_network_keeps_its_weights_and_a_network_built_in_inference_mode_becomes_usable(images):
    content, style = images
    vgg = tiny_vgg()
    before = {name: tensor for name, tensor in vgg.state_dict(keep_vars=True).items()}
    stylize(vgg, content, [GlobalStyle(style)], Settings(**FAST))
    after = vgg.state_dict(keep_vars=True)
    assert all(after[name] is tensor for name, tensor in before.items())  # the same tensors, untouched
    with torch.inference_mode():
        built = tiny_vgg()
    assert all(tensor.is_inference() for tensor in built.parameters())
    expected = {name: tensor.clone() for name, tensor in built.state_dict().items()}
    stylize(built, content, [GlobalStyle(style)], Settings(**FAST))
    assert not any(tensor.is_inference() for tensor in built.parameters())
    assert all(torch.equal(built.state_dict()[name], tensor) for name, tensor in expected.items())  # same values
