"""``shift-edit summarize``: mean / std / 95% CI per metric of run dirs, side by side, with published references."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bench.seq_summary import curves, curves_csv, is_sequential, plot_curves, summarize_sequential
from ..bench.summarize import bar_chart, by_dataset, load_reference, to_csv, to_markdown_by_dataset
from ..compat.result_import import case_ids_any, expand_paths, summarize_any
from ..core.errors import ShiftEditError
from ..files.io import atomic_write_json, atomic_write_text
from .common import check_out_root

NAME = "summarize"
HELP = "summarize benchmark run dirs (markdown, CSV, JSON, PNG), optionally beside published numbers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+",
                   help="results/<ALG>/run_<NNN> folders (a folder of run_* folders stands for them); "
                   "seq_<NNN> sequential runs (their last checkpoint, labelled with T and B, plus retention / "
                   "neighborhood / perplexity curves); ROME/MEMIT run folders (case_<id>.json / "
                   "<n>_edits-case_<id>.json, with or "
                   "without their hparams as params.json; told from ours by content) and EasyEdit result JSON files")
    p.add_argument("--reference", action="append", default=[], help="eval/reference/*.json to show beside (repeatable)")
    p.add_argument("--out", default=None, help="folder for summary.md/.csv/.json/.png (default: the first run dir)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG bar chart")
    p.add_argument("--common", action="store_true",
                   help="only the records every given run has finished (the same records in each row)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N records of each run (run order), after --common")


def run(args: argparse.Namespace) -> int:

    if args.limit is not None and args.limit < 1:
        raise ShiftEditError(f"--limit must be >= 1, got {args.limit}")
    if args.out:
        check_out_root(args.out, "--out")
    args.run_dirs = expand_paths(args.run_dirs)
    ids = None
    seq_dirs = [d for d in args.run_dirs if is_sequential(d)]
    one_dirs = [d for d in args.run_dirs if not is_sequential(d)]
    if args.common:
        sets = [case_ids_any(d) for d in one_dirs]
        ids = set.intersection(*sets)
        if not ids:
            raise ShiftEditError("--common: the runs have no finished record in common")
    rows = [summarize_any(d, case_ids=ids, limit=args.limit) for d in one_dirs]
    sizes = sorted({r["n"] for r in rows})
    if len(sizes) > 1:
        counts = ", ".join(f"{r['run_dir']}: {r['n']}" for r in rows)
        print(f"warning: the runs have different numbers of records ({counts}); "
              "means over different records are not comparable: use --common or --limit N", file=sys.stderr)
    for d in seq_dirs:  # sequential runs: the last checkpoint (label with T and B) and the unedited same records
        rows.extend(summarize_sequential(d))
    for ref in args.reference:
        rows.extend(load_reference(ref))
    first = Path(args.run_dirs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    md = to_markdown_by_dataset(rows)
    atomic_write_text(out / "summary.md", md)
    atomic_write_text(out / "summary.csv", to_csv(rows))
    atomic_write_json(out / "summary.json", {"rows": rows})
    print(md)
    if not args.no_plot:
        groups = by_dataset(rows)  # one chart per data set (summary_<data set>.png when there are several)
        for name, rs in groups.items():
            png = out / ("summary.png" if len(groups) == 1 else f"summary_{name.replace('/', '_')}.png")
            print(f"chart: {bar_chart(rs, png)}")
    if seq_dirs:
        crows = curves(seq_dirs)
        atomic_write_text(out / "curves.csv", curves_csv(crows))
        atomic_write_json(out / "curves.json", {"rows": crows})
        if not args.no_plot:
            print("curves: " + ", ".join(str(p) for p in plot_curves(crows, out)))
    print(f"written: {out}/summary.md, summary.csv, summary.json" + (", curves.csv, curves.json" if seq_dirs else ""))
    return 0
