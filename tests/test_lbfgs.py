"""Our L-BFGS takes exactly the steps of torch.optim.LBFGS as the optimiser uses it, with one host transfer."""

import os
from pathlib import Path

import pytest
import torch

from fusion_core.lbfgs import LBFGS


def objective(x, a, b):
    """Bounded, not convex where a < 0: some curvature pairs fail <y, s> > 0 and are left out."""
    return (a * x.square() + 0.5 * x.pow(4)).sum() + (b @ x.flatten()).square()


def ours_step(optimizer, closure):
    loss = closure()
    optimizer.step(optimizer.scalars().tolist())
    return loss


def run(make_optimizer, x0, a, b, steps):
    x = x0.clone().requires_grad_(True)
    optimizer = make_optimizer(x)
    path = []

    def closure():
        x.grad = None
        loss = objective(x, a, b)
        loss.backward()
        return loss

    for _ in range(steps):
        loss = ours_step(optimizer, closure) if isinstance(optimizer, LBFGS) else optimizer.step(closure)
        path.append(float(loss.detach()))
    return x.detach(), path, optimizer


def torch_lbfgs(lr, history_size):
    return lambda x: torch.optim.LBFGS(
        [x], lr=lr, max_iter=1, history_size=history_size, tolerance_grad=0, tolerance_change=0
    )


@pytest.mark.parametrize("history_size", [1, 3, 20])
@pytest.mark.parametrize("lr", [1.0, 0.5])
@pytest.mark.parametrize("problem", ["mixed", "concave-start"])
def test_same_steps_as_torch_lbfgs(history_size, lr, problem):
    generator = torch.Generator().manual_seed(history_size)
    x0 = torch.randn(2, 3, 5, 4, generator=generator)
    a = torch.randn(x0.shape, generator=generator)
    b = torch.randn(x0.numel(), generator=generator) * 0.1
    if problem == "concave-start":  # near 0 every direction is concave: curvature pairs get left out
        x0, a, b = x0 * 0.1, -torch.ones_like(a), torch.zeros_like(b)
    ours, our_path, optimizer = run(lambda x: LBFGS(x, lr=lr, history_size=history_size), x0, a, b, 40)
    theirs, their_path, _ = run(torch_lbfgs(lr, history_size), x0, a, b, 40)
    assert our_path == their_path
    assert torch.equal(ours, theirs)
    assert their_path[-1] < their_path[0]
    assert len(optimizer.pairs) == history_size  # the history filled and wrapped round
    if problem == "concave-start":
        assert optimizer.rejected > 0


def test_stops_at_a_stationary_point():
    x = torch.zeros(3, requires_grad=True)
    optimizer = LBFGS(x)

    def closure():
        x.grad = None
        loss = x.square().sum()
        loss.backward()
        return loss

    ours_step(optimizer, closure)
    assert optimizer.steps == 0 and torch.equal(x.detach(), torch.zeros(3))


@pytest.mark.parametrize("flat_steps", [(1,), (6,), (6, 7), (4, 9)])
def test_same_steps_as_torch_lbfgs_through_stationary_points(flat_steps):
    # A gradient of exact zeros (a flat spot of the objective, seen at these steps): torch's step returns at once
    # and changes nothing; the next step goes on with the history and the last direction as they were.
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 5, 4, generator=generator)  # the first test's sizes, whose arithmetic is torch's bit for bit
    a = torch.randn(x0.shape, generator=generator)
    b = torch.randn(x0.numel(), generator=generator) * 0.1

    def run_with_flat_steps(make_optimizer):
        x = x0.clone().requires_grad_(True)
        optimizer, path, calls = make_optimizer(x), [], []

        def closure():
            x.grad = None
            loss = objective(x, a, b)
            loss.backward()
            if len(calls) in flat_steps:
                x.grad.zero_()
            calls.append(1)
            return loss

        for _ in range(24):
            loss = ours_step(optimizer, closure) if isinstance(optimizer, LBFGS) else optimizer.step(closure)
            path.append(float(loss.detach()))
        return x.detach(), path

    ours, our_path = run_with_flat_steps(lambda x: LBFGS(x, lr=0.5, history_size=3))
    theirs, their_path = run_with_flat_steps(torch_lbfgs(0.5, 3))
    assert our_path == their_path
    assert torch.equal(ours, theirs)
    assert their_path[-1] < their_path[0]


def test_memory_is_allocated_once():
    x = torch.randn(64, requires_grad=True)
    optimizer = LBFGS(x, history_size=4)

    def closure():
        x.grad = None
        loss = (x.square() + x.pow(4)).sum()
        loss.backward()
        return loss

    ours_step(optimizer, closure)
    memory = optimizer._memory.data_ptr()
    for _ in range(12):
        ours_step(optimizer, closure)
    assert optimizer._memory.data_ptr() == memory
    assert optimizer._memory.shape == (2 * 4 + 2, 64)  # the history's 4 pairs, the previous gradient, d


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from Linux's /proc")
def test_the_whole_history_is_resident_from_the_first_step():
    """A run short of memory for its history fails at the first step, not after ``history_size`` steps: the
    buffer's pages are taken when it is allocated (an empty buffer would take them a history pair per step)."""

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    x = torch.randn(1 << 21, requires_grad=True)  # 8 MB: the buffer is 12 rows (history 5), 96 MB
    optimizer = LBFGS(x, history_size=5)
    x.grad = torch.ones_like(x)
    before = resident()
    optimizer.step(optimizer.scalars().tolist())
    assert resident() - before >= 0.9 * optimizer._memory.numel() * optimizer._memory.element_size()


def test_a_step_reads_nothing_from_the_device_but_its_scalars(monkeypatch):
    # Every way a Python value is read from a tensor (each one a wait for the GPU there), counted on the CPU.
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    optimizer = LBFGS(x, history_size=3)
    reads = []
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or _o(self, *a, **k)
        )
    for _ in range(8):
        x.grad = None
        (x.square() + x.pow(4) - x).sum().backward()
        numbers = optimizer.scalars()
        reads.clear()
        optimizer.step(numbers.tolist())
        assert reads == ["tolist"], reads  # the caller's one transfer; the step itself reads nothing
    assert optimizer.steps == 8 and len(optimizer.pairs) == 3
