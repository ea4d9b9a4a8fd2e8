"""PNG pictures of the lens results beside the heatmaps: the gradient rank view, the target-rank
curves and the neuron view, plus the text helpers every lens picture uses.

Token text is drawn with matplotlib's default font; characters it has no glyph for (and the
replacement character of a token that is part of a multi-byte character) are written as a
readable escape (``\\u4e2d``, ``<?>``), so no glyph warning is ever raised. Subject tokens are
marked in the heatmaps' column labels (orange, ``[ ]``), the target in the titles.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

from ..files.io import atomic_write_bytes

SUBJECT_COLOR = "#d95f02"


@functools.lru_cache(maxsize=1)
def _covered() -> frozenset[int]:
    """Code points the default font can draw."""
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties())
    return frozenset(ft2font.FT2Font(path).get_charmap())


def safe_text(text: str) -> str:
    """``text`` with every character the font cannot draw written as an escape."""
    covered = _covered()
    out = []
    for c in text:
        if c == "\ufffd":
            out.append("<?>")
        elif c.isprintable() and ord(c) in covered:
            out.append(c)
        elif c == " ":
            out.append(c)
        else:
            out.append(repr(c)[1:-1] if not c.isprintable() else f"\\u{ord(c):04x}")
    return "".join(out)


def _save(fig, path: str | Path, dpi: int = 90) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ranks(rows: list[dict], path: str | Path, *, title: str = "") -> Path:
    """The rank view: numerical rank of each layer's FF1 and FF2 gradient against n (the prompt length)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for kind, marker in (("ff1", "o"), ("ff2", "s")):
        pts = sorted((r["layer"], r["rank"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=3,
                    label=f"{kind.upper()} gradient rank")
    if rows:
        ax.axhline(rows[0]["n"], color="grey", ls="--", lw=1, label=f"n = {rows[0]['n']} prompt tokens")
    ax.set_xlabel("layer")
    ax.set_ylabel("numerical rank")
    ax.set_title(safe_text(title or "rank of dL/dW per layer (Backward Lens: at most n)"), fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_target_ranks(curves: dict[str, list[dict]], path: str | Path, *, target: str = "", original: str = "") -> Path:
    """Target-rank curves: the target's rank among the least probable tokens of FF2 δ_n per layer
    (1 = least probable, log scale), one curve per lens variant, and the model's answer's rank."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for variant, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["layer"])
        ax.plot([r["layer"] for r in rows], [r["target_rank"] for r in rows], marker="o", ms=3,
                label=f"target {safe_text(target)!r} ({variant} lens)")
        if original:
            ax.plot([r["layer"] for r in rows], [r["original_rank"] for r in rows], ls=":", lw=1,
                    label=f"model's answer {safe_text(original)!r} ({variant}, among most probable)")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("rank (1 = best)")
    ax.set_title("target rank in the FF2 gradient δ_n per layer", fontsize=9)
    ax.legend(fontsize=6.5)
    return _save(fig, path)


def plot_neurons(neurons: dict, path: str | Path, *, target: str = "") -> Path:
    """The neuron view: the FF2 gradient's strongest neurons (share of the squared norm, with
    their cumulative share), each labelled with its least probable tokens."""
    plt = _plt()
    rows = neurons["neurons"]
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [100 * r["share"] for r in rows], color="#1f77b4")
    labels = [
        f"#{r['neuron']}: " + " | ".join(safe_text(t).strip() or repr(t) for t in r["bottom_tokens"][:3]) for r in rows
    ]
    ax.set_yticks(ys, labels, fontsize=6.5)
    ax.set_xlabel("share of the squared gradient norm (%)")
    twin = ax.twiny()
    twin.plot([100 * r["cumulative_share"] for r in rows], ys, color="#d62728", marker=".", lw=1)
    twin.set_xlim(0, 100)
    ax.set_xlim(0, 100)
    twin.set_xlabel("cumulative share (%)", color="#d62728", fontsize=8)
    ax.set_title(safe_text(f"layer {neurons['layer']} FF2 gradient neurons (target {target})"), fontsize=9, pad=24)
    return _save(fig, path)
