"""``shift-edit lens``: Backward Lens figures and tables for one prompt and target."""

from __future__ import annotations

import argparse
import csv
import io

from ..core.errors import ShiftEditError
from ..core.requests import make_request
from ..files.io import atomic_write_json, atomic_write_text, provenance
from ..lens import (
    LogitLens,
    capture_gradients,
    check_decomposition,
    gradient_neurons,
    lens_grid,
    plot_grid,
    rank_table,
    target_ranks,
    token_segments,
)
from ..lens.logit_lens import decode_token
from ..lens.pictures import plot_neurons, plot_ranks, plot_target_ranks
from ..model.architectures import ModelAdapter
from .common import add_model_arguments, check_new_dir, load_from_args

NAME = "lens"
HELP = "project one prompt's gradients into the vocabulary (heatmaps, ranks, neuron view)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the prompt, or a template with {} for --subject")
    p.add_argument("--subject", default=None,
                   help="the subject (marks the subject tokens; required if --prompt has {})")
    p.add_argument("--target", required=True, help="the target whose NLL is back-propagated, e.g. ' Paris'")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder for figures and tables")
    p.add_argument("--top-k", type=int, default=5, help="tokens kept per cell in the tables (default 5)")
    p.add_argument("--color", choices=["delta", "x", "outer"], default="delta",
                   help="heatmap colour: ||δ_i|| (default), ||x_i|| or ||x_i||·||δ_i||")
    p.add_argument("--neuron-layer", type=int, default=None,
                   help="layer of the gradient neuron view (default: the FF2 gradient with the largest norm)")
    p.add_argument("--neurons", type=int, default=20, help="neurons listed in the neuron view (default 20)")
    p.add_argument("--check-layers", type=int, nargs="+", default=None, metavar="L",
                   help="layers whose weight gradients are materialised for the decomposition check "
                        "(default: all; for large models pick a few to save memory)")
    p.add_argument("--direct-rank", action="store_true",
                   help="numerical ranks from an SVD of each materialised gradient (slow) instead of its factors")


def _rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (" | ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ShiftEditError(f"--top-k must be >= 1, got {args.top_k}")
    if args.neurons < 1:
        raise ShiftEditError(f"--neurons must be >= 1, got {args.neurons}")
    out = check_new_dir(args.out, "--out")
    request = make_request({"prompt": args.prompt, "subject": args.subject, "target_new": args.target})
    model, tok = load_from_args(args)
    adapter = ModelAdapter(model)
    neuron_layer = None if args.neuron_layer is None else adapter.check_layer(args.neuron_layer)
    grad_layers = True if args.check_layers is None else [adapter.check_layer(x) for x in args.check_layers]
    lens = LogitLens(model, adapter)
    cap = capture_gradients(model, tok, request.text, request.target_new, adapter=adapter, weight_grads=grad_layers)
    out.mkdir(parents=True, exist_ok=True)

    checks = check_decomposition(cap)
    ranks = rank_table(cap, factored=not args.direct_rank)
    segments = token_segments(tok, request.text, request.subject, cap.n)
    for variant, normalized in (("plain", False), ("normalized", True)):
        for kind in ("ff1", "ff2"):
            grid = lens_grid(cap, lens, tok, kind, normalized=normalized, k=args.top_k)
            stem = f"{kind}_{variant}"
            plot_grid(grid, out / f"{stem}.png", color_by=args.color, target=request.target_new,
                      subject_positions=[i for i, s in enumerate(segments) if s in ("subject", "last_subject")])
            atomic_write_json(out / f"{stem}.json", grid.to_dict())
            atomic_write_text(out / f"{stem}.csv", grid.to_csv())
    tr = {v: target_ranks(cap, lens, normalized=(v == "normalized")) for v in ("plain", "normalized")}
    if neuron_layer is None:
        neuron_layer = max(cap.layers, key=lambda lc: float((lc.ff2.delta.double().T @ lc.ff2.x.double()).norm())).layer
    neurons = gradient_neurons(cap, lens, tok, neuron_layer, top=args.neurons, k=args.top_k)
    atomic_write_json(out / "neurons.json", neurons)
    atomic_write_text(out / "neurons.csv", _rows_csv(neurons["neurons"]))
    atomic_write_text(out / "neuron_groups.csv", _rows_csv(neurons["groups"]))
    atomic_write_text(out / "ranks.csv", _rows_csv(ranks))
    plot_ranks(ranks, out / "ranks.png")
    plot_target_ranks(
        tr,
        out / "target_ranks.png",
        target=decode_token(tok, cap.target_id),
        original=decode_token(tok, cap.original_id),
    )
    plot_neurons(neurons, out / "neurons.png", target=request.target_new)
    atomic_write_text(out / "target_ranks.csv", _rows_csv(
        [{"variant": v, **row} for v, rows in tr.items() for row in rows]))
    summary = _summary(args, model, tok, request, cap, checks, ranks, segments, tr, neuron_layer)
    atomic_write_json(out / "summary.json", summary)
    _report(request, tok, cap, checks, ranks, tr, summary, out)
    return 0 if summary["decomposition_ok"] else 1


def _summary(args, model, tok, request, cap, checks, ranks, segments, tr, neuron_layer) -> dict:
    """``summary.json``: the protocol, the request and its tokens, the decomposition check, ranks and target ranks."""
    return {
        "protocol": {
            "analysis": "Backward Lens (Katz et al. 2024): one forward + one backward pass of "
                        "-log p(first target token | prompt) at the last prompt position",
            "lens": "plain: softmax(E · final_norm(v)); normalized: unit-norm v before final_norm, "
                    "unit-norm rows of E (cosine ranking)",
            "ff1_cells": "most probable token of x_i", "ff2_cells": "least probable token of δ_i",
            "rank": "numerical rank: singular values > s_max · max(shape) · eps(float32), in float64, "
                    + ("SVD of the gradient" if args.direct_rank else "from the factors x, δ (QR, then SVD of n×n)"),
            "target_rank": "rank of the target among the least probable tokens of FF2 δ_n (1 = least probable); "
                           "original_rank: the model's top-1 answer among the most probable",
        },
        "request": request.to_dict(), "text": request.text,
        "tokens": [decode_token(tok, i) for i in cap.input_ids], "segments": segments, "n": cap.n,
        "target_id": cap.target_id, "target_token": decode_token(tok, cap.target_id),
        "original_id": cap.original_id, "original_token": decode_token(tok, cap.original_id),
        "loss": cap.loss, "target_prob": cap.target_prob,
        "decomposition_ok": all(c.ok for c in checks),
        "decomposition_max_relative_error": max(c.relative_error for c in checks),
        "decomposition": [c.to_dict() for c in checks],
        "ranks": ranks, "target_ranks": tr, "neuron_layer": neuron_layer,
        "provenance": provenance(model),
    }


def _report(request, tok, cap, checks, ranks, tr, summary, out) -> None:
    """The lines ``shift-edit lens`` prints."""
    last = cap.layers[-1]
    print(f"prompt {request.text!r} -> target {request.target_new!r} (p={cap.target_prob:.4g}); "
          f"model answers {decode_token(tok, cap.original_id)!r}; n={cap.n} tokens")
    print(f"decomposition grad == Σ x_iᵀ δ_i: {'ok' if summary['decomposition_ok'] else 'FAILED'} "
          f"(max relative error {summary['decomposition_max_relative_error']:.2e}, {len(checks)} matrices)")
    print(f"last layer FF2 gradient rank: "
          f"{[r['rank'] for r in ranks if r['layer'] == last.layer and r['kind'] == 'ff2'][0]}; "
          f"layers with FF2 rank == n: {sum(r['full'] for r in ranks if r['kind'] == 'ff2')}/{len(cap.layers)}")
    best = min(tr["plain"], key=lambda r: r["target_rank"])
    print(f"best target rank in δ_n (plain lens, from least probable): {best['target_rank']} at layer {best['layer']}")
    print(f"written to {out}/")
