"""The smallest step size that works: log-scale bracketing, then bisection in log space."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class MinLrResult:
    """Outcome of :func:`find_min_lr`.

    Attributes:
        lr: the smallest step found that succeeds (``None`` if none up to ``max_lr``).
        below: the largest step found that fails (``None`` if even ``min_lr`` succeeds).
        evals: how many times ``success`` was called.
    """

    lr: float | None
    below: float | None
    evals: int

    @property
    def found(self) -> bool:
        return self.lr is not None


def find_min_lr(
    success: Callable[[float], bool],
    *,
    start: float = 1.0,
    factor: float = 10.0,
    min_lr: float = 1e-8,
    max_lr: float = 1e8,
    rel_tol: float = 0.02,
) -> MinLrResult:
    """Smallest ``lr`` with ``success(lr)``, assuming success is monotone in ``lr``.

    Steps from ``start`` by ``factor`` (up while failing, down while succeeding) until
    the threshold is bracketed, then bisects the bracket at its geometric mean until
    ``hi / lo <= 1 + rel_tol``.
    """
    evals = 0

    def ok(lr: float) -> bool:
        nonlocal evals
        evals += 1
        return bool(success(lr))

    lr = start
    if ok(lr):
        hi, lo = lr, None
        while lr / factor >= min_lr:
            lr /= factor
            if ok(lr):
                hi = lr
            else:
                lo = lr
                break
        if lo is None:
            return MinLrResult(hi, None, evals)
    else:
        lo, hi = lr, None
        while lr * factor <= max_lr:
            lr *= factor
            if ok(lr):
                hi = lr
                break
            lo = lr
        if hi is None:
            return MinLrResult(None, lo, evals)
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(hi * lo)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return MinLrResult(hi, lo, evals)
