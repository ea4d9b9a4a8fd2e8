"""Layer sweep of the forward pass shift: metrics against the edited layer at fixed eta.

Top-1 family (strict: every target token the argmax under teacher forcing), per record:
efficacy (the new target after the rewrite prompt), paraphrase (the new target after each
paraphrase prompt, averaged), neighborhood (the TRUE object still predicted after each
neighborhood prompt, averaged; the unedited value is recorded for reference) and,
for the first records, WikiText perplexity. Run for ``raw`` and ``normalized`` eta.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..algorithms.shift.shift import ShiftHyperParams
from ..bench.plots import plot_ppl
from ..core.editing import edit
from ..core.requests import make_request
from ..files.io import atomic_write_json, provenance
from ..model.architectures import ModelAdapter
from ..model.resume import BlockRecorder, Resume
from ..model.scoring import score_continuations
from .common import ppl_stats, read_done, save_figure, write_record, write_tables

#: the algorithm the sweep edits with
ALG = ShiftHyperParams.ALG_NAME

log = logging.getLogger(__name__)


def top1_metrics(
    model: nn.Module, tok, record: dict[str, Any], *, recorder: BlockRecorder | None = None,
    resume: Resume | None = None,
) -> dict[str, float]:
    """Strict top-1 efficacy, paraphrase and neighborhood of one CounterFact record
    (``recorder`` / ``resume``: see :func:`~shift_edit.model.scoring.score_token_continuations`)."""
    req = make_request(record)
    para = list(record.get("paraphrase_prompts", []))
    neigh = list(record.get("neighborhood_prompts", []))
    prompts = [req.text] + para + neigh
    targets = [req.target_new] * (1 + len(para)) + [req.target_true] * len(neigh)
    scores = score_continuations(model, tok, prompts, targets, record=recorder, resume=resume)
    ok = [s.all_correct for s in scores]
    return {
        "efficacy": float(ok[0]),
        "paraphrase": statistics.fmean(ok[1 : 1 + len(para)]) if para else float("nan"),
        "neighborhood": statistics.fmean(ok[1 + len(para) :]) if neigh else float("nan"),
    }


def run_layer_sweep(
    model: nn.Module, tok, records: Sequence[dict[str, Any]], *, layers: Sequence[int],
    settings: Sequence[tuple[str, float]], out_dir: str | Path,
    ppl_fn: Callable[[nn.Module], float] | None = None, ppl_records: int = 0,
    protocol: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the sweep over ``layers`` x ``settings`` (``(eta_scaling, eta)`` pairs)."""
    out = Path(out_dir)
    key = {"study": "layer_sweep", "layers": list(layers), "settings": [list(s) for s in settings], **(protocol or {})}
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(tqdm(records, desc="layer-sweep records", unit="rec")):
        path = out / "records" / f"{rec['case_id']}.json"
        done = read_done(path, key)
        with_ppl = ppl_fn is not None and i < ppl_records
        if done is None or (with_ppl and not done.get("with_ppl")):
            cells = []
            # one unedited pass records every block's input; an edit of layer L re-runs blocks L.. only
            recorder = BlockRecorder(ModelAdapter(model))
            unedited = top1_metrics(model, tok, rec, recorder=recorder)
            for scaling, eta in settings:
                for layer in tqdm(layers, desc=f"case {rec['case_id']} {scaling}", leave=False):
                    hp = ShiftHyperParams(layers=[layer], eta=eta, eta_scaling=scaling, skip_if_predicted=False)
                    res = edit(model, tok, rec, hp, force=True)  # the sweep measures what breaks the model
                    try:
                        cell = {"eta_scaling": scaling, "eta": eta, "layer": layer,
                                **top1_metrics(model, tok, rec, resume=recorder.resume_after(res.deltas))}
                        if with_ppl:
                            cell["ppl"] = ppl_fn(model)
                    finally:
                        res.undo()
                    cells.append(cell)
            done = {"case_id": rec["case_id"], "with_ppl": with_ppl, "unedited": unedited, "cells": cells}
            write_record(path, key, done)
        rows.extend({"case_id": rec["case_id"], **c} for c in done["cells"])
        rows.append({"case_id": rec["case_id"], "eta_scaling": "unedited", "eta": 0.0, "layer": -1, **done["unedited"]})
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means per (eta_scaling, eta, layer); the ``unedited`` group has layer -1."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["eta_scaling"], r["eta"], r["layer"]), []).append(r)
    out = []
    for (scaling, eta, layer), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ppls = [r["ppl"] for r in rs if r.get("ppl") is not None]
        out.append({"eta_scaling": scaling, "eta": eta, "layer": layer, "n": len(rs),
                    **{m: statistics.fmean(r[m] for r in rs) for m in ("efficacy", "paraphrase", "neighborhood")},
                    **ppl_stats(ppls)})
    return out


def plot(summary: Sequence[dict[str, Any]], path: str | Path, title: str, base_ppl: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(s["eta_scaling"], s["eta"]) for s in summary if s["eta_scaling"] != "unedited"})
    base = next((s for s in summary if s["eta_scaling"] == "unedited"), None)
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(4.5 * (len(settings) + 1), 3.6), squeeze=False)
    for ax, (scaling, eta) in zip(axes[0], settings):
        ss = [s for s in summary if (s["eta_scaling"], s["eta"]) == (scaling, eta)]
        for m in ("efficacy", "paraphrase", "neighborhood"):
            ax.plot([s["layer"] for s in ss], [s[m] for s in ss], marker="o", ms=3, label=m)
        if base is not None:
            ax.axhline(base["neighborhood"], color="gray", ls=":", label="neighborhood unedited")
        ax.set_title(f"SHIFT {scaling} eta={eta:g}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for scaling, eta in settings:
        ss = [s for s in summary if (s["eta_scaling"], s["eta"]) == (scaling, eta) and s["ppl_median"] is not None]
        if ss:  # medians: one broken edit (inf) would dominate a mean
            plot_ppl(ax, [s["layer"] for s in ss], [s["ppl_median"] for s in ss], f"{scaling} {eta:g}", base_ppl)
    if base_ppl is not None:
        ax.axhline(base_ppl, color="gray", ls="--", label="unedited")
    if not any(s["ppl_median"] is not None for s in summary):
        ax.text(0.5, 0.5, "perplexity not measured in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("WikiText ppl, median (▲: off scale)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure(fig, title, path)


def write_outputs(rows, out_dir: str | Path, model: nn.Module, meta: dict[str, Any],
                  base_ppl: float | None) -> dict[str, Any]:
    """rows.csv, summary.csv, summary.json (with provenance) and layer_sweep.png in ``out_dir``."""
    out = Path(out_dir)
    summary = summarize(rows)
    write_tables(out, rows, summary)
    doc = {"study": "layer_sweep", "metric_family": "strict top-1 (MEMIT)", **meta, "unedited_ppl": base_ppl,
           "summary": summary, "provenance": provenance(model)}
    atomic_write_json(out / "summary.json", doc)
    n = len({r["case_id"] for r in rows})
    plot(summary, out / "layer_sweep.png", f"SHIFT layer sweep, strict top-1, N={n} records", base_ppl)
    return doc
