"""L-BFGS on the image, with all its memory allocated once and one host transfer per step.

The iteration is ``torch.optim.LBFGS``'s with ``max_iter=1``, no line search and no stopping tolerances
(the same arithmetic; tests compare the two step by step): one loss evaluation per step, a step of ``lr``
along the two-loop direction, the first one scaled by 1 / |g|_1. Two things differ.

Memory: torch's version allocates its history, search direction and gradient copies as new image-sized
tensors every iteration and frees the oldest; blocks of that size come from the C heap, and allocating and
freeing them in turn leaves holes the process never gives back (about 12 MB more resident memory per
iteration at 1024 px, on top of the history itself). Here they live in one buffer, allocated at the first step:
the history's pairs, the previous gradient and the direction, 2 * history_size + 2 image-sized rows.

Host transfers: on a GPU every Python decision on a device value (``if ys > eps``, ``float(t)``, a tensor
``alpha=``) stalls the queue until the value arrives. A step needs three numbers from the device (the
curvature <y, s>, |y|^2 and |g|_1); ``scalars()`` returns them as one tensor, which the caller transfers
together with whatever else it reports, and ``step(numbers)`` takes them back. The rest is device arithmetic:
the two loops multiply by 0-d tensors, and the descent test picks the step length on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class LBFGS:
    """Minimise over ``param`` (one tensor). After each evaluation has set ``param.grad``::

    numbers = optimizer.scalars().tolist()   # or stacked with the caller's values, one transfer
    optimizer.step(numbers)
    """

    def __init__(self, param: Tensor, lr: float = 1.0, history_size: int = 20) -> None:
        self.param, self.lr, self.history_size = param, lr, history_size
        self.steps = 0
        self.pairs: list[tuple[int, int]] = []  # the buffer's rows of the kept (y, s) pairs, oldest first
        self.ro: list[float] = []  # 1 / <y, s> of each kept pair
        self.rejected = 0  # pairs left out because <y, s> was not positive (the curvature condition)
        self.t, self.h_diag = lr, 1.0
        self._memory: Tensor | None = None
        self._previous, self._d = 0, 1  # the rows of the previous gradient and of the direction
        self._free: list[int] = []  # rows no pair holds
        self._held = False  # the last step stopped at a stationary point: the working rows hold its (y, s)

    @torch.no_grad()
    def scalars(self) -> Tensor:
        """(<y, s>, |y|^2, |g|_1) for this step, on the device. y and s (the change of gradient and of ``param``
        since the last step) are written over the previous gradient and the direction, which are not needed once
        they are formed: the buffer holds no spare pair."""
        grad = self.param.grad.reshape(-1)
        if self._memory is None:
            # Rows: the history's pairs, then the previous gradient and the direction d (the two-loop's q too).
            # Zeros, not empty: the pages are taken now rather than a history pair per step, so a run without the
            # memory for its history stops here and not minutes later, and the first steps use the memory every
            # later one does.
            rows = 2 * self.history_size + 2
            self._memory = grad.new_zeros(rows, grad.numel())
            self._free = list(range(2, rows))
        gsum = grad.abs().sum()
        if self.steps == 0:
            return torch.stack([gsum.new_zeros(()), gsum.new_zeros(()), gsum])
        y, s = self._memory[self._previous], self._memory[self._d]
        if self._held:  # y holds -(the previous gradient) and s this step's s already (``step``)
            y.add_(grad)
        else:
            torch.sub(grad, y, out=y)
            s.mul_(self.t)
        self._held = False
        return torch.stack([y.dot(s), y.dot(y), gsum])

    @torch.no_grad()
    def step(self, numbers: Sequence[float]) -> None:
        """Update ``param`` from its gradient; ``numbers`` are ``scalars()``'s values, on the host."""
        ys, yy, gsum = numbers
        if gsum == 0:  # at a stationary point: nothing to do
            # After a step, ``scalars`` wrote y = 0 - previous gradient (exactly its negative) and s = t d, which
            # the next step's would be again: it picks them up from there.
            self._held = self.steps > 0
            return
        grad = self.param.grad.reshape(-1)
        self.steps += 1
        rows = self._memory
        if self.steps > 1:
            if ys > 1e-10:  # the pair (y, s) is kept in its rows; the working rows move to free ones
                if len(self.pairs) == self.history_size:
                    self._free.extend(self.pairs.pop(0))
                    self.ro.pop(0)
                self.pairs.append((self._previous, self._d))
                self.ro.append(1.0 / ys)
                self.h_diag = ys / yy
                self._previous, self._d = self._free.pop(), self._free.pop()
            else:
                self.rejected += 1
        # -g: the first step's direction; after it, the two-loop's q, which becomes the direction in the same row
        d = torch.neg(grad, out=rows[self._d])
        if self.steps == 1:
            self.h_diag = 1.0
        else:
            al: list[Tensor] = [grad] * len(self.pairs)  # placeholders, each set before it is read
            for i in range(len(self.pairs) - 1, -1, -1):
                y, s = self.pairs[i]
                al[i] = rows[s].dot(d) * self.ro[i]
                d.addcmul_(rows[y], al[i], value=-1)
            d.mul_(self.h_diag)
            for i in range(len(self.pairs)):
                y, s = self.pairs[i]
                be_i = rows[y].dot(d) * self.ro[i]
                d.addcmul_(rows[s], al[i] - be_i)
        rows[self._previous].copy_(grad)
        self.t = min(1.0, 1.0 / gsum) * self.lr if self.steps == 1 else self.lr
        # Not a descent direction: keep the image (torch's rule with tolerance_change=0), decided on the device.
        length = torch.where(grad.dot(d) > 0, 0.0, self.t)
        self.param.view(-1).addcmul_(d, length)
