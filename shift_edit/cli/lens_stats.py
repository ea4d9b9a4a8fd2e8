"""``shift-edit lens-stats``: aggregate Backward Lens curves over CounterFact-style records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.errors import ShiftEditError
from ..core.requests import make_request
from ..files.io import atomic_write_json, atomic_write_text, provenance
from ..lens.stats import aggregate_csv, lens_stats, plot_stats
from .common import add_model_arguments, check_new_dir, load_from_args

NAME = "lens-stats"
HELP = "aggregate gradient-rank, target-rank and segment curves over many records"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="JSON list of records (CounterFact/ROME or EasyEdit format)")
    p.add_argument("--limit", type=int, default=100, help="use the first N records (default 100)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder for plots and tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_records(path: str, limit: int) -> list:
    """The first ``limit`` requests of a JSON list file."""
    p = Path(path)
    if not p.is_file():
        raise ShiftEditError(f"--data {path}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShiftEditError(f"--data {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list) or not data:
        raise ShiftEditError(f"--data {path}: expected a non-empty JSON list of records")
    return [make_request(r) for r in data[:limit]]


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ShiftEditError(f"--limit must be >= 1, got {args.limit}")
    out = check_new_dir(args.out, "--out")
    requests = load_records(args.data, args.limit)
    model, tok = load_from_args(args)
    result = lens_stats(model, tok, requests, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    agg = result["aggregate"]
    files = plot_stats(agg, out, label=Path(args.model.rstrip("/")).name)
    atomic_write_text(out / "stats.csv", aggregate_csv(agg))
    atomic_write_json(out / "stats.json", {
        "protocol": {
            "analysis": "Backward Lens aggregates: per record one forward + one backward pass of "
                        "-log p(first target_new token | prompt) at the last prompt position",
            "data": str(args.data), "limit": args.limit, "records": "the first N records, in file order",
            "rank": "numerical rank of each FF1/FF2 gradient from its factors (float64 QR+SVD), "
                    "threshold s_max · max(shape) · eps(float32)",
            "ranks_normalized": "(rank - 1) / (vocab - 1); target_rank counted from the least probable "
                                "token of FF2 δ_n, original/true from the most probable",
            "layer_index_normalized": "layer / (n_layers - 1)",
        },
        "aggregate": agg, "records": result["records"], "skipped": result["skipped"],
        "provenance": provenance(model),
    })
    print(f"{agg['n_records']} records analysed ({len(result['skipped'])} skipped); "
          f"last-layer FF2 gradient rank one in {agg['last_layer_ff2_rank_one_share']:.0%}")
    print(f"written to {out}/: stats.json, stats.csv, {', '.join(files)}")
    return 0
