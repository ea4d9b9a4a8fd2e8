"""``shift-edit sweep``: the minimum learning-rate study and the layer sweep (:mod:`shift_edit.studies`)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from ..core.errors import ShiftEditError
from ..core.registry import linear_step_fields
from ..files.data_files import require_data
from ..model.architectures import ModelAdapter
from ..studies import layer_sweep, min_lr
from ..studies.counterfact_records import load_records
from ..studies.perplexity import load_wikitext_lines, protocol_text, wikitext_perplexity
from .common import add_model_arguments, check_out_root, load_from_args

NAME = "sweep"
#: the default ``--algs`` of the min-lr study (any algorithm registered with ``linear_step`` is accepted)
DEFAULT_ALGS = ",".join(min_lr.DEFAULT_ALGS)
HELP = (f"minimum lr per layer for {'/'.join(min_lr.DEFAULT_ALGS)} (and ppl there), or the {layer_sweep.ALG} layer "
        f"sweep; "
        "resumable")


def _layers(text: str, n_layers: int) -> list[int]:
    if text == "all":
        return list(range(n_layers))
    try:
        out = []
        for part in text.split(","):
            if ":" in part:
                a, b, *step = (int(x) for x in part.split(":"))
                out.extend(range(a, b, step[0] if step else 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ShiftEditError(f"--layers {text!r}: expected 'all', '0,5,10' or 'start:stop[:step]'") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad or not out:
        raise ShiftEditError(f"--layers {text!r}: " + (f"layer {bad[0]} is out of range: the model has {n_layers} "
                                                       f"layers "
                             f"(0..{n_layers - 1})" if bad else "selects no layer"))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--study", required=True, choices=["min-lr", "layer-sweep"])
    p.add_argument("--out", required=True, help="output folder (re-running with the same options resumes)")
    p.add_argument("--data", default=None,
                   help="CounterFact JSON (default: <shared data>/" + "counterfact-original-format-subset837.json)")
    p.add_argument("--n-records", type=int, default=20)
    p.add_argument("--sample-seed", type=int, default=None, help="seeded random sample instead of the first N records")
    p.add_argument("--case-ids", default=None, help="comma-separated case ids (overrides --n-records)")
    p.add_argument("--layers", default="all", help="'all', '0,5,10' or 'start:stop[:step]'")
    p.add_argument("--algs", default=DEFAULT_ALGS, help=f"min-lr: algorithms (default {DEFAULT_ALGS})")
    p.add_argument("--criterion", choices=["first", "strict"], default="first",
                   help="min-lr: target's first token top-1 (default) or every token (strict)")
    p.add_argument("--start", type=float, default=1e-5, help="min-lr: first step tried; the scan goes up by 10x")
    p.add_argument("--max-lr", type=float, default=1e5, help="min-lr: give up above this step")
    p.add_argument("--rel-tol", type=float, default=0.02, help="min-lr: bisection stops at hi/lo <= 1+tol")
    p.add_argument("--eta-raw", type=float, default=None, help="layer-sweep: raw eta (omit to skip)")
    p.add_argument("--eta-normalized", type=float, default=None, help="layer-sweep: normalized eta (omit to skip)")
    p.add_argument("--ppl-records", type=int, default=0, help="measure WikiText ppl for the first K records (slow)")
    p.add_argument("--ppl-lines", type=int, default=100, help="WikiText lines for ppl (paper: 100)")
    p.add_argument("--ppl-max-tokens", type=int, default=256,
                   help="truncate each ppl line to this many tokens (paper: 256)")
    p.add_argument("--ppl-batch-size", type=int, default=1, help="ppl lines per forward pass (same result, faster)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    algs = [a.strip() for a in args.algs.split(",")]
    step_fields = linear_step_fields()
    bad = [a for a in algs if a not in step_fields]
    if args.study == "min-lr" and bad:
        default = [a for a in DEFAULT_ALGS.split(",") if a in step_fields]
        supported = default + [a for a in step_fields if a not in default]
        raise ShiftEditError(f"--algs: {bad} not supported by the min-lr study ({', '.join(supported)})")
    if args.ppl_max_tokens < 1 or args.ppl_batch_size < 1 or args.ppl_lines < 1:
        raise ShiftEditError("--ppl-lines, --ppl-max-tokens and --ppl-batch-size must be >= 1")
    if args.study == "layer-sweep" and args.eta_raw is None and args.eta_normalized is None:
        raise ShiftEditError("layer-sweep needs --eta-raw and/or --eta-normalized")
    try:
        case_ids = [int(c) for c in args.case_ids.split(",")] if args.case_ids else None
    except ValueError:
        raise ShiftEditError(f"--case-ids {args.case_ids!r}: expected comma-separated integers") from None
    check_out_root(args.out, "--out")
    records = load_records(args.data, args.n_records, sample_seed=args.sample_seed, case_ids=case_ids)
    model, tok = load_from_args(args)
    layers = _layers(args.layers, ModelAdapter(model).n_layers)
    ppl_fn, base_ppl = None, None
    if args.ppl_records > 0:
        lines = load_wikitext_lines(require_data("wikitext"), args.ppl_lines)
        ppl_fn = functools.partial(wikitext_perplexity, tok=tok, lines=lines, max_tokens=args.ppl_max_tokens,
                                   batch_size=args.ppl_batch_size)
        base_ppl = ppl_fn(model)
    ppl_text = protocol_text(args.ppl_lines, args.ppl_max_tokens) if ppl_fn else None
    meta = {"model": args.model, "n_records": len(records), "case_ids": [r["case_id"] for r in records],
            "layers": layers, "seed": args.seed, "ppl_protocol": ppl_text,
            "ppl_lines": args.ppl_lines if ppl_fn else None,
            "ppl_max_tokens": args.ppl_max_tokens if ppl_fn else None, "ppl_records": args.ppl_records}
    ppl_protocol = {"lines": args.ppl_lines, "max_tokens": args.ppl_max_tokens} if ppl_fn else None
    out = Path(args.out)
    if args.study == "min-lr":
        meta.update(algs=algs, criterion=args.criterion, rel_tol=args.rel_tol, start=args.start, max_lr=args.max_lr,
                    step_fields={a: step_fields[a] for a in algs},
                    note=min_lr.PROTOCOL_NOTE)
        rows = min_lr.run_min_lr_study(model, tok, records, algs=algs, layers=layers, out_dir=out,
                                       criterion=args.criterion, start=args.start, max_lr=args.max_lr,
                                       rel_tol=args.rel_tol, ppl_fn=ppl_fn,
                                       ppl_records=args.ppl_records, protocol={"model": args.model},
                                       ppl_protocol=ppl_protocol)
        min_lr.write_outputs(rows, out, model, meta, base_ppl)
    else:
        settings = [(s, e) for s, e in (("raw", args.eta_raw), ("normalized", args.eta_normalized)) if e is not None]
        meta.update(settings=settings)
        rows = layer_sweep.run_layer_sweep(model, tok, records, layers=layers, settings=settings, out_dir=out,
                                           ppl_fn=ppl_fn, ppl_records=args.ppl_records,
                                           protocol={"model": args.model, "ppl": ppl_protocol})
        layer_sweep.write_outputs(rows, out, model, meta, base_ppl)
    print(f"wrote {out}/summary.csv, summary.json, rows.csv and the plot")
    return 0
