"""Plot pieces shared by the studies' and the sequential runs' figures (they take a matplotlib axis;
matplotlib itself is imported by the callers, from the ``plot`` extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def plot_ppl(ax, xs: Sequence[float], ys: Sequence[float], label: str, base_ppl: float | None, *,
             color: str | None = None, ms: float = 3) -> None:
    """Perplexity against ``xs`` on a log axis. Values above 100x ``base_ppl`` (a broken model's,
    up to inf, would flatten every other point) are drawn at that cap as a labelled ▲."""
    cap = 100 * base_ppl if base_ppl else math.inf
    (line,) = ax.plot(xs, [min(y, cap) for y in ys], marker="o", ms=ms, label=label, color=color)
    off = [(x, y) for x, y in zip(xs, ys) if y > cap]
    if off:
        ax.plot([x for x, _ in off], [cap] * len(off), ls="none", marker="^", ms=7, color=line.get_color())
        for x, y in off:
            ax.annotate("inf" if math.isinf(y) else f"{y:.0e}", (x, cap), fontsize=6,
                        textcoords="offset points", xytext=(-8, -10), color=line.get_color())
