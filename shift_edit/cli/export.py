"""``shift-edit export``: a run directory in ROME's, MEMIT's or EasyEdit's result format."""

from __future__ import annotations

import argparse

from ..compat.result_export import FORMATS, export_run

NAME = "export"
HELP = "write a bench run dir as ROME/MEMIT case files or an EasyEdit result JSON (their summarize scripts read it)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a results/<ALG>/run_<NNN> folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="rome: case_<id>.json; memit: "
                   "<n>_edits-case_<id>.json with *_prompts_correct (both with the run's hparams as params.json, as "
                   "their "
                   "evaluate.py writes); easyedit: results.json (values strict top-1, labelled)")
    p.add_argument("--out", required=True, help="a new (or empty) folder")


def run(args: argparse.Namespace) -> int:
    files = export_run(args.run_dir, args.out, args.format)
    print(f"written: {len(files)} file(s) in {args.out} ({args.format} format)")
    return 0
