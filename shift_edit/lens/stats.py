"""Aggregate Backward Lens statistics over many requests (Figs. 4, 6, 7, 18, 19).

Per request (one forward + one backward pass of the target_new NLL at the last
position, weight gradients not materialised):

- the numerical rank of every FF1/FF2 gradient (from its factors) and whether it equals n,
- the Logit Lens rank of target_new among the *least* probable tokens of δ_n (last
  position, FF2) per layer, and of the model's original answer and of target_true
  among the *most* probable ones, for the plain and the normalised lens,
- per prompt segment (subject / last subject token / other / last token) the mean
  ``||δ_i||`` of FF2 and the segment's share of ``Σ_i ||x_i||·||δ_i||``.

Layers are reported on a normalised index ``layer / (L - 1)`` and ranks as
``(rank - 1) / (vocab - 1)`` (0 = best) so models of different sizes share a plot.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ShiftEditError
from ..core.requests import EditRequest, encode_target
from ..files.io import atomic_write_bytes
from ..model.architectures import ModelAdapter
from .capture import capture_gradients
from .logit_lens import LogitLens, rank_in_logits
from .rank import factored_rank
from .segments import SEGMENTS, token_segments

log = logging.getLogger(__name__)


def record_stats(model: nn.Module, tok, request: EditRequest, lens: LogitLens, adapter: ModelAdapter) -> dict:
    """The per-request statistics described in the module docstring."""
    cap = capture_gradients(model, tok, request.text, request.target_new, adapter=adapter, weight_grads=False)
    true_id = encode_target(tok, request.text, request.target_true)[0] if request.target_true else None
    labels = token_segments(tok, request.text, request.subject, cap.n)
    out: dict = {"case_id": request.case_id, "n": cap.n, "target_id": cap.target_id,
                 "original_id": cap.original_id, "true_id": true_id, "target_prob": cap.target_prob,
                 "segments": labels, "rank": {"ff1": [], "ff2": []}}
    for lc in cap.layers:
        out["rank"]["ff1"].append([factored_rank(m) for m in lc.ff1])
        out["rank"]["ff2"].append(factored_rank(lc.ff2))
    deltas = torch.stack([lc.ff2.delta[-1] for lc in cap.layers])
    for variant, normalized in (("plain", False), ("normalized", True)):
        logits = lens.logits(deltas, normalized=normalized)
        out[f"target_rank_{variant}"] = rank_in_logits(logits, cap.target_id, order="bottom").tolist()
        out[f"original_rank_{variant}"] = rank_in_logits(logits, cap.original_id, order="top").tolist()
        if true_id is not None:
            out[f"true_rank_{variant}"] = rank_in_logits(logits, true_id, order="top").tolist()
    seg_norm = {s: [] for s in SEGMENTS}
    seg_share = {s: [] for s in SEGMENTS}
    for lc in cap.layers:
        d = lc.ff2.delta.norm(dim=-1).double()
        mass = lc.ff2.x.norm(dim=-1).double() * d
        total = float(mass.sum())
        for s in SEGMENTS:
            idx = [i for i, lab in enumerate(labels) if lab == s]
            seg_norm[s].append(float(d[idx].mean()) if idx else None)
            seg_share[s].append(float(mass[idx].sum()) / total if idx and total > 0 else (0.0 if total > 0 else None))
    out["segment_delta_norm"] = seg_norm
    out["segment_share"] = seg_share
    return out


def lens_stats(model: nn.Module, tok, requests: Sequence[EditRequest], *, progress: bool = True) -> dict:
    """Run :func:`record_stats` over ``requests`` (with a progress bar) and aggregate.

    Requests that cannot be analysed (e.g. a subject not found in the prompt) are listed
    under ``skipped`` with the reason.
    """
    adapter = ModelAdapter(model)
    lens = LogitLens(model, adapter)
    records, skipped = [], []
    for req in tqdm(requests, desc="lens-stats", unit="record", disable=not progress):
        try:
            records.append(record_stats(model, tok, req, lens, adapter))
        except ShiftEditError as exc:
            skipped.append({"case_id": req.case_id, "reason": str(exc)})
            log.info("skipped %s: %s", req.case_id, exc)
    if not records:
        raise ShiftEditError("no request could be analysed")
    return {"aggregate": aggregate(records, adapter.n_layers, lens.vocab_size), "records": records, "skipped": skipped}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def aggregate(records: list[dict], n_layers: int, vocab: int) -> dict:
    """Per-layer aggregates of :func:`record_stats` outputs (see the module docstring)."""
    L = n_layers
    x = [layer / (L - 1) if L > 1 else 0.0 for layer in range(L)]
    agg: dict = {"n_records": len(records), "n_layers": L, "vocab": vocab, "layer_index_normalized": x,
                 "prompt_len_mean": statistics.fmean(r["n"] for r in records)}
    # rank == n
    full = {"ff1": [], "ff2": []}
    mean_rank_ratio = {"ff1": [], "ff2": []}
    for layer in range(L):
        f1 = [rk == r["n"] for r in records for rk in r["rank"]["ff1"][layer]]
        f2 = [r["rank"]["ff2"][layer] == r["n"] for r in records]
        full["ff1"].append(sum(f1) / len(f1) if f1 else None)
        full["ff2"].append(sum(f2) / len(f2))
        r1 = [rk / r["n"] for r in records for rk in r["rank"]["ff1"][layer]]
        mean_rank_ratio["ff1"].append(statistics.fmean(r1) if r1 else None)
        mean_rank_ratio["ff2"].append(statistics.fmean(r["rank"]["ff2"][layer] / r["n"] for r in records))
    agg["rank_equals_n_share"] = full
    agg["rank_over_n_mean"] = mean_rank_ratio
    agg["last_layer_ff2_rank_one_share"] = sum(r["rank"]["ff2"][-1] == 1 for r in records) / len(records)
    agg["last_layer_ff1_rank_one_share"] = sum(all(rk == 1 for rk in r["rank"]["ff1"][-1]) for r in records) / len(
        records
    )
    # target ranks
    ranks: dict = {}
    for key in ("target_rank", "original_rank", "true_rank"):
        for variant in ("plain", "normalized"):
            name = f"{key}_{variant}"
            rows = [r[name] for r in records if name in r]
            if not rows:
                continue
            per_layer = {"q1": [], "median": [], "q3": [], "top10_share": [], "top1_share": []}
            for layer in range(L):
                vals = [(row[layer] - 1) / (vocab - 1) for row in rows]
                q1, med, q3 = _quartiles(vals)
                per_layer["q1"].append(q1)
                per_layer["median"].append(med)
                per_layer["q3"].append(q3)
                per_layer["top10_share"].append(sum(row[layer] <= 10 for row in rows) / len(rows))
                per_layer["top1_share"].append(sum(row[layer] == 1 for row in rows) / len(rows))
            ranks[name] = per_layer
    agg["ranks_normalized"] = ranks
    # segments
    seg: dict = {"delta_norm_mean": {}, "share_mean": {}}
    for s in SEGMENTS:
        for field, dest in (("segment_delta_norm", "delta_norm_mean"), ("segment_share", "share_mean")):
            col = []
            for layer in range(L):
                vals = [r[field][s][layer] for r in records if r[field][s][layer] is not None]
                col.append(statistics.fmean(vals) if vals else None)
            seg[dest][s] = col
    agg["segments"] = seg
    return agg


def aggregate_csv(agg: dict) -> str:
    """One row per layer with the main aggregate columns."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    ranks = agg["ranks_normalized"]
    rank_cols = [(name, stat) for name in sorted(ranks) for stat in ("median", "top10_share")]
    seg = agg["segments"]
    header = ["layer", "layer_index_normalized", "ff1_rank_equals_n_share", "ff2_rank_equals_n_share"]
    header += [f"{name}_{stat}" for name, stat in rank_cols]
    header += [f"share_{s}" for s in SEGMENTS] + [f"delta_norm_{s}" for s in SEGMENTS]
    w.writerow(header)
    for layer in range(agg["n_layers"]):
        row = [layer, f"{agg['layer_index_normalized'][layer]:.4f}",
               _fmt(agg["rank_equals_n_share"]["ff1"][layer]), _fmt(agg["rank_equals_n_share"]["ff2"][layer])]
        row += [_fmt(ranks[name][stat][layer]) for name, stat in rank_cols]
        row += [_fmt(seg["share_mean"][s][layer]) for s in SEGMENTS]
        row += [_fmt(seg["delta_norm_mean"][s][layer]) for s in SEGMENTS]
        w.writerow(row)
    return buf.getvalue()


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}"


def _save(fig, path, dpi: int = 90) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_stats(agg: dict, out_dir, *, label: str = "") -> list[str]:
    """Write ``rank_share.png``, ``target_rank.png`` and ``segments.png``; return the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    x = agg["layer_index_normalized"]
    suffix = f" ({label}, {agg['n_records']} records)" if label else f" ({agg['n_records']} records)"

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for kind, style in (("ff1", "o-"), ("ff2", "s-")):
        ys = [float("nan") if v is None else v for v in agg["rank_equals_n_share"][kind]]
        ax.plot(x, ys, style, ms=3, label=f"{kind.upper()} gradient")
    ax.set_xlabel("normalised layer index")
    ax.set_ylabel("share with rank = n")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Gradient rank equals prompt length" + suffix, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, out_dir / "rank_share.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    names = {"target_rank": "target_new (from least probable)", "original_rank": "original answer (from most probable)",
             "true_rank": "target_true (from most probable)"}
    for ax, variant in zip(axes, ("plain", "normalized")):
        for key, label_text in names.items():
            stats_ = agg["ranks_normalized"].get(f"{key}_{variant}")
            if stats_ is None:
                continue
            line, = ax.plot(x, stats_["median"], "-", label=label_text)
            ax.fill_between(x, stats_["q1"], stats_["q3"], color=line.get_color(), alpha=0.18)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_ylim(0, 1)
        ax.set_xlabel("normalised layer index")
        ax.set_title(f"{variant} Logit Lens of FF2 δ_n" + suffix, fontsize=9)
    axes[0].set_ylabel("normalised rank (0 = best); median, IQR")
    axes[0].legend(fontsize=7)
    _save(fig, out_dir / "target_rank.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for s in SEGMENTS:
        share = [float("nan") if v is None else v for v in agg["segments"]["share_mean"][s]]
        norm = [float("nan") if v is None else v for v in agg["segments"]["delta_norm_mean"][s]]
        axes[0].plot(x, share, label=s)
        axes[1].plot(x, norm, label=s)
    axes[0].set_ylabel("share of Σ ||x_i||·||δ_i|| (FF2)")
    axes[1].set_ylabel("mean ||δ_i|| (FF2)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("normalised layer index")
        ax.legend(fontsize=7)
    axes[0].set_title("FF2 gradient mass per prompt segment" + suffix, fontsize=9)
    axes[1].set_title("VJP norm per prompt segment" + suffix, fontsize=9)
    _save(fig, out_dir / "segments.png")
    return ["rank_share.png", "target_rank.png", "segments.png"]
