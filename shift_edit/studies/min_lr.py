"""Minimum learning rate per record and layer (paper Fig. 24a) and the damage there (Fig. 24b).

For each record, algorithm (SHIFT, SGD, ADAM) and layer: the smallest step size
(eta for SHIFT, lr for SGD / ADAM) that makes the new target the top-1 prediction
after the rewrite prompt, found by :func:`~.search.find_min_lr` scanning upward by decades from a small
start (large steps can overshoot: success is not monotone far above the threshold,
so the scan reports the first decade that works, then bisects below it). All three deltas
are linear in the step size, so the delta is computed once at step 1 and scaled.
Optionally the WikiText perplexity of the model edited at that step is measured.
Each record's results go to their own JSON file (atomic), so a run resumes.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.common import adapter_for
from ..bench.plots import plot_ppl
from ..core.requests import encode_prompt, encode_target, make_request
from ..files.io import atomic_write_json, provenance
from ..model.resume import BlockRecorder, Resume, first_edited_block
from ..model.scoring import pad_id_of, score_token_continuations
from .common import (
    ppl_stats,
    read_done,
    save_figure,
    scaled,
    temporarily_applied,
    unit_deltas,
    unit_hparams,
    write_record,
    write_tables,
)
from .search import find_min_lr

#: the algorithms the study compares unless told otherwise (any registered with ``linear_step`` is accepted)
DEFAULT_ALGS = ("SHIFT", "SGD", "ADAM")
#: the protocol of the default comparison, recorded with the results
PROTOCOL_NOTE = "SHIFT raw eta; SGD/ADAM lr, single step on FF2, first target token, full gradient"

log = logging.getLogger(__name__)

Criterion = Literal["first", "strict"]


def is_top1(
    model: nn.Module, tok, prompt_ids: list[int], target_ids: list[int], criterion: Criterion, *,
    resume: Resume | None = None,
) -> bool:
    """Is the target the top-1 prediction: its first token (``"first"``) or every token (``"strict"``)
    (``resume``: re-run only some blocks, :mod:`shift_edit.model.resume`)."""
    (score,) = score_token_continuations(model, [(prompt_ids, target_ids)], pad_id=pad_id_of(tok), resume=resume)
    return score.first_correct if criterion == "first" else score.all_correct


def min_lr_for(
    model: nn.Module, tok, record: dict[str, Any], alg: str, layer: int, *,
    criterion: Criterion = "first", start: float = 1e-5, max_lr: float = 1e5, rel_tol: float = 0.02,
    ppl_fn: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    """One (record, algorithm, layer) cell: the minimum step, and the perplexity there if asked."""
    req = make_request(record)
    p_ids, t_ids = encode_prompt(tok, req.text), encode_target(tok, req.text, req.target_new)
    hp = unit_hparams(alg, layer)
    unit = unit_deltas(model, tok, req, hp)
    # The edit changes block `first` and later only: record the unedited input of that block
    # once, and let each trial re-run only the blocks from there (shift_edit.model.resume).
    adapter = adapter_for(model, hp)
    first = first_edited_block(adapter, unit)
    resume = None
    if first:
        recorder = BlockRecorder(adapter, first, stop=True)
        with recorder.batch():
            is_top1(model, tok, p_ids, t_ids, criterion)
        resume = recorder.resume_after(unit)

    def success(lr: float) -> bool:
        with temporarily_applied(model, scaled(unit, lr)):
            return is_top1(model, tok, p_ids, t_ids, criterion, resume=resume)

    res = find_min_lr(success, start=start, max_lr=max_lr, rel_tol=rel_tol)
    out = {"alg": alg, "layer": layer, "min_lr": res.lr, "below": res.below, "evals": res.evals,
           "unit_delta_norm": sum(d.norm() ** 2 for d in unit) ** 0.5}
    if ppl_fn is not None and res.found:
        out["ppl"] = _ppl_edited(model, unit, res.lr, ppl_fn)
    return out


def _ppl_edited(model: nn.Module, unit, lr: float, ppl_fn: Callable[[nn.Module], float]) -> float:
    with temporarily_applied(model, scaled(unit, lr)):
        return ppl_fn(model)


def ppl_at(model: nn.Module, tok, record: dict[str, Any], alg: str, layer: int, lr: float,
           ppl_fn: Callable[[nn.Module], float]) -> float:
    """Perplexity of the model edited by one (record, algorithm, layer) step of size ``lr``
    (the deltas are linear in the step: the step-1 delta, scaled), the model restored after."""
    return _ppl_edited(model, unit_deltas(model, tok, make_request(record), unit_hparams(alg, layer)), lr, ppl_fn)


def run_min_lr_study(
    model: nn.Module, tok, records: Sequence[dict[str, Any]], *, algs: Sequence[str], layers: Sequence[int],
    out_dir: str | Path, criterion: Criterion = "first", start: float = 1e-5, max_lr: float = 1e5,
    rel_tol: float = 0.02, ppl_fn: Callable[[nn.Module], float] | None = None, ppl_records: int = 0,
    protocol: dict[str, Any] | None = None, ppl_protocol: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the study; returns one row per (record, alg, layer).

    Per-record files go to ``out_dir/records/<case_id>.json``; perplexity (if ``ppl_fn``)
    is measured for the first ``ppl_records`` records only (it is the slow part).
    ``protocol`` identifies the search (a record searched under another one is redone);
    ``ppl_protocol`` the perplexity measurement: a record searched earlier without it (or
    with another) keeps its minimum steps and only gets the perplexity there measured.
    """
    out = Path(out_dir)
    torch.manual_seed(0)
    key = {"study": "min_lr", "algs": list(algs), "layers": list(layers), "criterion": criterion,
           "rel_tol": rel_tol, "start": start, "max_lr": max_lr, **(protocol or {})}
    ppl_tag = dict(ppl_protocol or {"measured": True})
    rows: list[dict[str, Any]] = []
    cells = [(a, layer) for a in algs for layer in layers]
    for i, rec in enumerate(tqdm(records, desc="min-lr records", unit="rec")):
        path = out / "records" / f"{rec['case_id']}.json"
        done = read_done(path, key)
        with_ppl = ppl_fn is not None and i < ppl_records
        if done is None:
            cell_rows = [
                min_lr_for(model, tok, rec, a, layer, criterion=criterion, start=start, max_lr=max_lr,
                           rel_tol=rel_tol, ppl_fn=ppl_fn if with_ppl else None)
                for a, layer in tqdm(cells, desc=f"case {rec['case_id']}", leave=False)
            ]
            done = {"case_id": rec["case_id"], "ppl_protocol": ppl_tag if with_ppl else None, "cells": cell_rows}
            write_record(path, key, done)
        elif with_ppl and done.get("ppl_protocol") != ppl_tag:
            for c in tqdm(done["cells"], desc=f"ppl, case {rec['case_id']}", leave=False):
                c.pop("ppl", None)
                if c["min_lr"] is not None:  # found (as in min_lr_for)
                    c["ppl"] = ppl_at(model, tok, rec, c["alg"], c["layer"], c["min_lr"], ppl_fn)
            done["ppl_protocol"] = ppl_tag
            write_record(path, key, {k: v for k, v in done.items() if k != "protocol_key"})
        rows.extend({"case_id": rec["case_id"], **c} for c in done["cells"])
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (alg, layer): records, already top-1 (excluded), found, median / quartiles of the minimum step, mean ppl."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["alg"], r["layer"]), []).append(r)
    out = []
    for (alg, layer), rs in sorted(groups.items()):
        # success already at the smallest step tried (no failing step below): top-1 before editing
        already = [r for r in rs if r["min_lr"] is not None and r["below"] is None]
        lrs = sorted(r["min_lr"] for r in rs if r["min_lr"] is not None and r["below"] is not None)
        ppls = [r["ppl"] for r in rs if r.get("ppl") is not None]
        q = statistics.quantiles(lrs, n=4, method="inclusive") if len(lrs) >= 2 else [lrs[0]] * 3 if lrs else [None] * 3
        out.append({"alg": alg, "layer": layer, "n": len(rs), "already_top1": len(already), "found": len(lrs),
                    "median_min_lr": statistics.median(lrs) if lrs else None, "q25": q[0], "q75": q[2],
                    **ppl_stats(ppls)})
    return out


def plot(summary: Sequence[dict[str, Any]], path: str | Path, title: str, base_ppl: float | None = None) -> None:
    """Two panels: median minimum step (IQR band, log scale) and perplexity, against the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for alg in sorted({s["alg"] for s in summary}):
        ss = [s for s in summary if s["alg"] == alg and s["median_min_lr"] is not None]
        xs = [s["layer"] for s in ss]
        a1.plot(xs, [s["median_min_lr"] for s in ss], marker="o", label=alg)
        a1.fill_between(xs, [s["q25"] for s in ss], [s["q75"] for s in ss], alpha=0.2)
        sp = [s for s in ss if s["ppl_median"] is not None]
        if sp:  # medians: one broken edit would dominate a mean
            plot_ppl(a2, [s["layer"] for s in sp], [s["ppl_median"] for s in sp], alg, base_ppl)
    if base_ppl is not None:
        a2.axhline(base_ppl, color="gray", ls="--", label="unedited")
    if not any(s["ppl_median"] is not None for s in summary):
        a2.text(0.5, 0.5, "perplexity not measured in this run", ha="center", va="center", transform=a2.transAxes)
    for s in summary:  # how many records reached top-1 at all, under each point
        if s["median_min_lr"] is not None:
            a1.annotate(f"{s['found']}/{s['n']}", (s["layer"], s["median_min_lr"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    if any(s["median_min_lr"] is not None for s in summary):  # a log axis needs a positive value
        a1.set_yscale("log")
    else:
        a1.text(0.5, 0.5, "no record reached top-1 below the largest step tried", ha="center", va="center",
                transform=a1.transAxes)
    a1.set_xlabel("layer")
    a1.set_ylabel("minimum lr / eta (median, IQR)")
    if a1.get_legend_handles_labels()[0]:
        a1.legend()
    a2.set_xlabel("layer")
    a2.set_ylabel("WikiText ppl at min lr, median")
    if any(s["ppl_median"] is not None for s in summary) or base_ppl is not None:
        a2.set_yscale("log")
    if a2.get_legend_handles_labels()[0]:
        a2.legend()
    save_figure(fig, title, path)


def write_outputs(rows, out_dir: str | Path, model: nn.Module, meta: dict[str, Any],
                  base_ppl: float | None) -> dict[str, Any]:
    """rows.csv, summary.csv, summary.json (with provenance) and min_lr.png in ``out_dir``."""
    out = Path(out_dir)
    summary = summarize(rows)
    write_tables(out, rows, summary)
    doc = {"study": "min_lr", **meta, "unedited_ppl": base_ppl, "summary": summary, "provenance": provenance(model)}
    atomic_write_json(out / "summary.json", doc)
    n = len({r["case_id"] for r in rows})
    plot(summary, out / "min_lr.png", f"min lr to make the target top-1 ({meta.get('criterion')}), N={n} records",
         base_ppl)
    return doc
