"""Per-prompt views: the layer × token Logit Lens grid (paper Figs. 5, 11, 22) and target ranks.

FF1 cells project x_i (most probable token); FF2 cells project δ_i (least probable
token). Every cell also carries ``||x_i||``, ``||δ_i||`` and ``||x_i||·||δ_i||`` (the
Frobenius norm of the rank-one term x_iᵀ δ_i); the figure colours by one of them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..files.io import atomic_write_bytes
from .capture import GradientCapture
from .logit_lens import LogitLens, decode_token, rank_in_logits
from .pictures import SUBJECT_COLOR, safe_text

Kind = Literal["ff1", "ff2"]
ColorBy = Literal["delta", "x", "outer"]


@dataclass
class LensGrid:
    """A layers × prompt-tokens table of projected tokens and norms."""

    kind: str
    normalized: bool
    order: str  # "top" for FF1 (x_i), "bottom" for FF2 (δ_i)
    layers: list[int]
    tokens: list[str]  # prompt tokens as text
    cells: list[list[dict]] = field(default_factory=list)  # [layer][position]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "normalized": self.normalized, "order": self.order,
                "layers": self.layers, "tokens": self.tokens, "cells": self.cells}

    def to_csv(self) -> str:
        """One row per (layer, position)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["kind", "normalized", "order", "layer", "position", "prompt_token", "projected_token",
                    "projected_prob", "k_tokens", "x_norm", "delta_norm", "outer_norm"])
        for layer, row in zip(self.layers, self.cells):
            for pos, c in enumerate(row):
                w.writerow([self.kind, int(self.normalized), self.order, layer, pos, self.tokens[pos], c["token"],
                            f"{c['prob']:.6g}", " | ".join(c["k_tokens"]), f"{c['x_norm']:.6g}",
                            f"{c['delta_norm']:.6g}", f"{c['outer_norm']:.6g}"])
        return buf.getvalue()


def lens_grid(capture: GradientCapture, lens: LogitLens, tok, kind: Kind = "ff2", *,
              normalized: bool = False, k: int = 5) -> LensGrid:
    """Project every layer's FF1 inputs x_i (``kind="ff1"``, most probable tokens) or FF2
    VJPs δ_i (``kind="ff2"``, least probable tokens) into the vocabulary.

    For gated MLPs the FF1 x_i is the input shared by gate and up projections and the FF1
    ``delta_norm`` combines both VJPs (see :meth:`LayerCapture.ff1_delta_norm`).
    """
    order = "top" if kind == "ff1" else "bottom"
    grid = LensGrid(kind, normalized, order, [lc.layer for lc in capture.layers],
                    [decode_token(tok, i) for i in capture.input_ids])
    for lc in capture.layers:
        if kind == "ff1":
            vecs, x_norm, d_norm = lc.ff1_x, lc.ff1_x.norm(dim=-1), lc.ff1_delta_norm()
        else:
            vecs, x_norm, d_norm = lc.ff2.delta, lc.ff2.x.norm(dim=-1), lc.ff2.delta.norm(dim=-1)
        probs = lens.probs(vecs, normalized=normalized)
        values, ids = probs.topk(k, dim=-1, largest=(order == "top"))
        row = []
        for pos in range(capture.n):
            toks = [decode_token(tok, i) for i in ids[pos].tolist()]
            row.append({"token": toks[0], "prob": float(values[pos, 0]), "k_tokens": toks,
                        "k_ids": ids[pos].tolist(), "x_norm": float(x_norm[pos]),
                        "delta_norm": float(d_norm[pos]), "outer_norm": float(x_norm[pos] * d_norm[pos])})
        grid.cells.append(row)
    return grid


def target_ranks(capture: GradientCapture, lens: LogitLens, *, normalized: bool = False,
                 extra: dict[str, int] | None = None) -> list[dict]:
    """Per layer: the Logit Lens rank of the target in the last position's FF2 δ_n.

    ``target_rank`` counts from the least probable token (the target should come out near
    1, since subtracting δ promotes it); ``original_rank`` (the model's own top-1 answer)
    counts from the most probable. ``extra`` maps names to token ids ranked like the original.
    """
    deltas = torch.stack([lc.ff2.delta[-1] for lc in capture.layers])
    logits = lens.logits(deltas, normalized=normalized)
    t = rank_in_logits(logits, capture.target_id, order="bottom")
    o = rank_in_logits(logits, capture.original_id, order="top")
    rows = []
    for i, lc in enumerate(capture.layers):
        row = {"layer": lc.layer, "target_rank": int(t[i]), "original_rank": int(o[i]),
               "delta_norm": float(lc.ff2.delta[-1].norm())}
        for name, tid in (extra or {}).items():
            row[f"{name}_rank"] = int(rank_in_logits(logits[i], tid, order="top"))
        rows.append(row)
    return rows


def plot_grid(grid: LensGrid, path, *, color_by: ColorBy = "delta", title: str | None = None, dpi: int = 90,
              subject_positions: Sequence[int] = (), target: str | None = None) -> None:
    """Draw a grid like the paper's heatmaps (rows layers, columns prompt tokens, cell text the
    projected token, colour the chosen norm on a log scale) and save it as PNG. Columns at
    ``subject_positions`` are marked (orange, bracketed); ``target`` goes into the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    key = {"delta": "delta_norm", "x": "x_norm", "outer": "outer_norm"}[color_by]
    values = torch.tensor([[c[key] for c in row] for row in grid.cells], dtype=torch.float64)
    positive = values[values > 0]
    vmin = float(positive.min()) if positive.numel() else 1e-12
    vmax = float(values.max()) if positive.numel() else 1.0
    shown = values.clamp_min(vmin).numpy()
    n_layers, n_tok = shown.shape
    fig, ax = plt.subplots(figsize=(1.15 * n_tok + 2.2, 0.27 * n_layers + 1.6))
    im = ax.imshow(shown, aspect="auto", cmap="Blues", norm=LogNorm(vmin=vmin, vmax=max(vmax, vmin * 1.0001)),
                   origin="lower", interpolation="nearest")
    log_mid = (torch.tensor(vmin).log() + torch.tensor(max(vmax, vmin)).log()) / 2
    for li, row in enumerate(grid.cells):
        for pi, c in enumerate(row):
            dark = values[li, pi] > 0 and torch.tensor(float(shown[li, pi])).log() > log_mid
            ax.text(pi, li, _short(c["token"]), ha="center", va="center", fontsize=6.5,
                    color="white" if dark else "black")
    subj = set(subject_positions)
    ax.set_xticks(range(n_tok), [f"[{_short(t)}]" if i in subj else _short(t) for i, t in enumerate(grid.tokens)],
                  rotation=45, ha="right", fontsize=8)
    for i, label in enumerate(ax.get_xticklabels()):
        if i in subj:
            label.set_color(SUBJECT_COLOR)
            label.set_fontweight("bold")
    ax.set_yticks(range(n_layers), [str(layer) for layer in grid.layers], fontsize=6.5)
    ax.set_ylabel("layer")
    what = "x_i (top-1)" if grid.kind == "ff1" else "δ_i (least probable)"
    tgt = f" (target {_short(target, 16)}, subject in [ ])" if target is not None else ""
    ax.set_title(title or f"{grid.kind.upper()}: Logit Lens of {what}{', normalised' if grid.normalized else ''}{tgt}",
                 fontsize=9)
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label({"delta": "||δ_i||", "x": "||x_i||", "outer": "||x_i||·||δ_i||"}[color_by], fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _short(text: str, width: int = 10) -> str:
    text = safe_text(text)
    return text if len(text) <= width else text[: width - 1] + "…"
