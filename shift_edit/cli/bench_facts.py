"""``shift-edit bench --data zsre|knowedit-*|FILE``: the zsRE / KnowEdit runs (single edits and ``--sequential``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bench.counterfact import file_sha256
from ..bench.fact_runner import FactBenchConfig, run_fact_bench
from ..bench.fact_sequential import FactScoring
from ..bench.facts import FACT_DATASETS, load_facts
from ..bench.run_dirs import shard_env
from ..bench.sequential import SequentialConfig, order_cases, run_sequential
from ..bench.wikitext import PerplexityProtocol
from ..core.errors import ShiftEditError
from ..core.shipped_hparams import hparams_model_mismatch
from ..model.loading import check_model_name
from .common import default_wikitext, find_hparams, load_from_args, parse_eval_at


def _refuse_counterfact_options(args: argparse.Namespace) -> None:
    """Options of the CounterFact families only: one line instead of being ignored."""
    bad = [flag for flag, on in (("--case-ids", args.case_ids is not None), ("--ppl-every", args.ppl_every > 0),
                                 ("--no-kl", args.no_kl), ("--wild-neighborhood", args.wild_neighborhood),
                                 ("--procs", args.procs != 1),
                                 ("--portability", args.portability)) if on]
    if bad:
        raise ShiftEditError(f"{', '.join(bad)}: not used with zsRE / KnowEdit data (their families are "
                             "zsre_token_acc/zsre_top1 or easyedit); use --start/--limit to select records")


def run_facts(args: argparse.Namespace, data: Path, fmt: str) -> int:
    """Run ``bench`` on a zsRE or KnowEdit file; everything is checked before the model is loaded."""
    _refuse_counterfact_options(args)
    cases = load_facts(data, fmt=fmt, limit=args.limit, start=args.start)
    dataset = args.data if args.data in FACT_DATASETS else data.stem
    hparams = None
    if args.alg != "NONE":
        check_model_name(args.model)
        hparams = find_hparams(args.alg, args.model, args.hparams)
        if hparams is None:
            raise ShiftEditError(f"no shipped hparams for {args.alg} / {args.model}: pass --hparams FILE")
    elif args.hparams:
        raise ShiftEditError("--alg NONE takes no --hparams")
    info = {"path": str(data), "sha256": file_sha256(data), "n_selected": len(cases), "limit": args.limit,
            "start": args.start, "dataset": dataset, "format": fmt}
    if args.sequential is not None:
        return _sequential(args, cases, hparams, info, fmt, dataset)
    if args.batch_edits != 1 or args.eval_at or args.shuffle_seed is not None:
        raise ShiftEditError("--batch-edits, --eval-at and --shuffle-seed need --sequential T")
    cfg = FactBenchConfig(alg=args.alg, hparams=hparams, dataset=dataset, fmt=fmt, seed=args.seed,
                          fluency=not args.skip_generation, batch_size=args.batch_size, num_edits=args.num_edits)
    rank, world = shard_env()
    model, tok = load_from_args(args)
    if hparams is not None and rank == 0 and (note := hparams_model_mismatch(hparams, model)):
        print(f"warning: {note}; results may not match the tuned protocol", file=sys.stderr)
    run_dir = run_fact_bench(model, tok, cases, cfg, args.out, data_info=info, model_name=args.model, rank=rank,
                             world_size=world, progress=not args.no_progress)
    if rank == 0:
        print(f"results: {run_dir}")
    return 0


def _sequential(args: argparse.Namespace, cases, hparams, info: dict, fmt: str, dataset: str) -> int:
    if args.alg == "NONE":
        raise ShiftEditError("--sequential needs an editing --alg (the unedited reference is measured in the run)")
    if args.num_edits != 1:
        raise ShiftEditError("--sequential uses --batch-edits B, not --num-edits")
    if args.ppl_lines < 0:
        raise ShiftEditError(f"--ppl-lines must be >= 0, got {args.ppl_lines}")
    wikitext = args.wikitext
    if args.ppl_lines and wikitext is None:
        wikitext = default_wikitext()
        if wikitext is None:
            raise ShiftEditError("perplexity needs --wikitext FILE or $SHIFT_EDIT_DATA's wikitext (or --ppl-lines 0)")
    cfg = SequentialConfig(alg=args.alg, hparams=hparams, total=args.sequential, batch_edits=args.batch_edits,
                           eval_at=parse_eval_at(args.eval_at),
                           seed=args.seed, shuffle_seed=args.shuffle_seed, ppl=args.ppl_lines > 0,
                           ppl_protocol=PerplexityProtocol(name="paper", n_lines=max(1, args.ppl_lines)),
                           wikitext=wikitext, batch_size=args.batch_size, save_every=args.save_every, skip_wild=True)
    order_cases(cases, cfg.total, cfg.shuffle_seed)  # T larger than the selection: one line, before loading
    model, tok = load_from_args(args)
    run_dir = run_sequential(model, tok, cases, cfg, args.out, data_info=info, model_name=args.model,
                             progress=not args.no_progress, scoring=FactScoring(fmt, dataset))
    print(f"results: {run_dir}")
    return 0
