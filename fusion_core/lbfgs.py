"""L-BFGS on the image, with all its memory allocated once.

The iteration is ``torch.optim.LBFGS``'s with ``max_iter=1``, no line search and no stopping tolerances
(the same arithmetic; tests compare the two step by step): one loss evaluation per step, a step of ``lr``
along the two-loop direction, the first one scaled by 1 / |g|_1. Only the memory differs. torch's version
allocates its history, search direction and gradient copies as new image-sized tensors every iteration
and frees the oldest; blocks of that size come from the C heap, and allocating and freeing them in turn
leaves holes the process never gives back (about 12 MB more resident memory per iteration at 1024 px,
on top of the history itself). Here they live in one buffer, allocated at the first step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class LBFGS:
    """Minimise over ``param`` (one tensor); ``step(closure)`` evaluates the loss once and updates it.

    ``closure`` sets ``param.grad`` (it runs with autograd on) and returns the loss.
    """

    def __init__(self, param: Tensor, lr: float = 1.0, history_size: int = 20) -> None:
        self.param, self.lr, self.history_size = param, lr, history_size
        self.steps = 0
        self.pairs: list[int] = []  # rows of the kept (y, s) pairs, oldest first
        self.ro: list[Tensor] = []  # 1 / <y, s> of each kept pair
        self.rejected = 0  # pairs left out because <y, s> was not positive (the curvature condition)
        self._memory: Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        grad = self.param.grad.reshape(-1)
        if not grad.any():  # at a stationary point: nothing to do
            return loss
        self.steps += 1
        if self._memory is None:
            # Rows: history_size + 1 slots for y and s each (one spare, written before it is accepted), then
            # the direction d, the previous gradient and the two-loop's q.
            slots = self.history_size + 1
            self._memory = grad.new_empty(2 * slots + 3, grad.numel())
            self._y, self._s = self._memory[:slots], self._memory[slots : 2 * slots]
            self._d, self._previous, self._q = self._memory[2 * slots :]
        d = self._d
        if self.steps == 1:
            torch.neg(grad, out=d)
            self.h_diag: Tensor | float = 1
        else:
            spare = min(set(range(self.history_size + 1)) - set(self.pairs))
            y, s = self._y[spare], self._s[spare]
            torch.sub(grad, self._previous, out=y)
            torch.mul(d, self.t, out=s)
            ys = y.dot(s)
            if ys > 1e-10:
                if len(self.pairs) == self.history_size:
                    self.pairs.pop(0)
                    self.ro.pop(0)
                self.pairs.append(spare)
                self.ro.append(1.0 / ys)
                self.h_diag = ys / y.dot(y)
            else:
                self.rejected += 1
            q = torch.neg(grad, out=self._q)
            al: list = [None] * len(self.pairs)
            for i in range(len(self.pairs) - 1, -1, -1):
                al[i] = self._s[self.pairs[i]].dot(q) * self.ro[i]
                q.add_(self._y[self.pairs[i]], alpha=-al[i])
            torch.mul(q, self.h_diag, out=d)
            for i in range(len(self.pairs)):
                be_i = self._y[self.pairs[i]].dot(d) * self.ro[i]
                d.add_(self._s[self.pairs[i]], alpha=al[i] - be_i)
        self._previous.copy_(grad)
        self.t = min(1.0, 1.0 / grad.abs().sum()) * self.lr if self.steps == 1 else self.lr
        if grad.dot(d) > 0:  # not a descent direction: keep the image (torch's rule with tolerance_change=0)
            return loss
        self.param.add_(d.view_as(self.param), alpha=self.t)
        return loss
