"""``shift-edit bench``: run the CounterFact benchmark for one algorithm (or NONE, the unedited model)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from ..bench.bench_config import BenchConfig
from ..bench.counterfact import file_sha256, load_counterfact, parse_case_ids, resolve_data
from ..bench.facts import FORMATS, detect_format
from ..bench.run_dirs import n_shares, shard_env
from ..bench.runner import run_bench
from ..bench.sequential import SequentialConfig, order_cases, run_sequential
from ..bench.wikitext import PerplexityProtocol
from ..bench.wild import DEFAULT_MAX_NEW_TOKENS
from ..core.errors import ShiftEditError
from ..core.registry import algorithm_names
from ..core.shipped_hparams import hparams_model_mismatch
from ..files.json_records import read_json_records
from ..model.loading import check_model_name
from .bench_facts import run_facts
from .common import (
    add_model_arguments,
    check_model_args,
    check_out_root,
    default_wikitext,
    find_hparams,
    load_from_args,
)
from .common import parse_eval_at as _parse_eval_at

NAME = "bench"
HELP = "run the CounterFact, zsRE or KnowEdit benchmark (resumable; shards under accelerate launch)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--alg", required=True, choices=[*algorithm_names(), "NONE"],
                   help="algorithm, or NONE for the unedited model")
    p.add_argument("--hparams", default=None, help="hparams YAML (default: hparams/<ALG>/<model>.yaml if shipped)")
    p.add_argument("--data", default=None,
                   help="CounterFact JSON (ROME or EasyEdit format), or a data set name (counterfact, "
                   "counterfact-subset: "
                   "found in $SHIFT_EDIT_DATA or the user cache, see `shift-edit data`); 'download' fetches the "
                   "official file (sha256-checked); "
                   "'hf:NAME[:SPLIT]' a hub dataset via datasets ('hf:' = azhx/counterfact); zsRE and KnowEdit: zsre, "
                   "knowedit-zsre, knowedit-recent, knowedit-counterfact, or their files (scored in their papers' "
                   "families: zsre_token_acc + zsre_top1, easyedit)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="the data file's format (default: told from the first record's fields)")
    p.add_argument("--portability", action="store_true",
                   help="CounterFact: also score EasyEdit's portability question on the records that have one "
                        "(family easyedit_portability, column cf_portability; e.g. counterfact-original-format-"
                        "portability1031.json)")
    p.add_argument("--limit", type=int, default=None, help="number of records")
    p.add_argument("--start", type=int, default=0, help="skip this many records first")
    p.add_argument("--case-ids", default=None, help="comma list / ranges of case ids, e.g. 0,5,10-20")
    p.add_argument("--out", default="results", help="results root (default results/)")
    p.add_argument("--seed", type=int, default=0, help="seed for generation sampling (default 0)")
    p.add_argument("--skip-generation", action="store_true", help="no generation / n-gram entropy")
    p.add_argument("--gen-records", type=int, default=4, metavar="K",
                   help="records whose generations share one decoding batch, each with its own edit added to its "
                        "rows (default 4; 1 = one record at a time)")
    p.add_argument("--gen-every", type=int, default=1, metavar="K",
                   help="generate (n-gram entropy) for every K-th record only (default 1: all; the summary's "
                        "ngram_entropy n says how many)")
    add_wild_arguments(p)
    p.add_argument("--ppl-every", type=int, default=0, metavar="K",
                   help="WikiText perplexity after every K-th edit (0: never)")
    p.add_argument("--ppl-protocol", choices=["paper", "standard"], default="paper",
                   help="perplexity protocol (default paper)")
    p.add_argument("--wikitext", default=None,
                   help="WikiText-2 raw test file (default: wikitext from $SHIFT_EDIT_DATA or the user cache, see "
                   "`shift-edit data`, else datasets)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default 64)")
    p.add_argument("--score-records", type=int, default=16, metavar="K",
                   help="records whose passes on the unedited model share forward batches (default 16; 1: each "
                        "record alone; the values differ only by float round-off)")
    p.add_argument("--no-kl", action="store_true",
                   help="skip the neighborhood KL (saves two forward passes per record)")
    p.add_argument("--num-edits", type=int, default=1, metavar="N",
                   help="apply N consecutive records' requests at once, then evaluate each (MEMIT protocol; default 1)")
    p.add_argument("--procs", type=int, default=1, metavar="N",
                   help="run N processes on this machine, each on its share of the records and cores, "
                        "into one run dir (default 1; on a 2-core CPU, 2 is ~1.4x faster); at most the cores and the "
                        "shares of records (a larger N is lowered, with a warning)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sequential_arguments(p)


def add_wild_arguments(p: argparse.ArgumentParser) -> None:
    """The WILD-style free-generation family (shift_edit.bench.wild), single-edit and --sequential runs."""
    g = p.add_argument_group("WILD-style free generation (columns gen_efficacy, gen_paraphrase, gen_rephrase, "
                             "gen_neighborhood)")
    g.add_argument("--skip-wild", action="store_true",
                   help="no free-generation metric (greedy continuation says the new object before the true one)")
    g.add_argument("--wild-max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"greedy new tokens per prompt (default {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--wild-neighborhood", action="store_true",
                   help="also decode the neighborhood prompts (gen_neighborhood: the true object said before the new "
                        "one); about 4x the decoding of rewrite + paraphrase prompts")
    g.add_argument("--wild-records", type=int, default=8, metavar="K",
                   help="records per greedy decoding batch (default 8)")


def wild_options(args: argparse.Namespace) -> dict:
    """The BenchConfig / SequentialConfig fields of the WILD-style family."""
    return {"skip_wild": args.skip_wild, "wild_max_new_tokens": args.wild_max_new_tokens,
            "wild_neighborhood": args.wild_neighborhood, "wild_records": args.wild_records}


def add_sequential_arguments(p: argparse.ArgumentParser) -> None:
    """Lifelong editing: ``--sequential T --batch-edits B --eval-at ...`` (shift_edit.bench.sequential)."""
    g = p.add_argument_group("sequential (lifelong) editing")
    g.add_argument("--sequential", type=int, default=None, metavar="T",
                   help="edit T records one batch after another, never undoing (each batch computed on the model the "
                        "earlier ones left); all edits made so far are scored at each --eval-at checkpoint and at T")
    g.add_argument("--batch-edits", type=int, default=1, metavar="B",
                   help="requests per edit call in --sequential mode (default 1); B need not divide T (the last batch "
                        "is smaller); a checkpoint is measured after the batch that reaches it")
    g.add_argument("--eval-at", default=None, metavar="N,N,...",
                   help="checkpoints, in numbers of edits (e.g. 10,100,500,1000); T is always one")
    g.add_argument("--shuffle-seed", type=int, default=None, metavar="S",
                   help="shuffle the selected records with seed S before taking the first T (default: data order)")
    g.add_argument("--ppl-lines", type=int, default=20, metavar="N",
                   help="WikiText lines of the perplexity at each checkpoint (paper protocol; 0: no perplexity; "
                   "default 20)")
    g.add_argument("--save-every", type=int, default=50, metavar="N",
                   help="save the resumable state at least every N edits (and at every checkpoint; default 50)")



def run_sequential_args(args: argparse.Namespace, cases, data, hparams, wikitext) -> int:
    """``bench --sequential``: checks everything before the model is loaded, then runs."""
    if args.alg == "NONE":
        raise ShiftEditError("--sequential needs an editing --alg (the unedited reference is measured in the run)")
    if args.num_edits != 1:
        raise ShiftEditError("--sequential uses --batch-edits B, not --num-edits")
    if args.procs != 1:
        raise ShiftEditError("--sequential runs in one process (--procs 1)")
    if args.portability:
        raise ShiftEditError("--portability is scored in single-edit runs only (not --sequential)")
    if args.ppl_lines < 0:
        raise ShiftEditError(f"--ppl-lines must be >= 0, got {args.ppl_lines}")
    if args.ppl_lines and wikitext is None:
        if importlib.util.find_spec("datasets") is None:
            raise ShiftEditError("perplexity needs --wikitext FILE or the datasets package (or --ppl-lines 0)")
    cfg = SequentialConfig(alg=args.alg, hparams=hparams, total=args.sequential, batch_edits=args.batch_edits,
                           eval_at=_parse_eval_at(args.eval_at), seed=args.seed, shuffle_seed=args.shuffle_seed,
                           ppl=args.ppl_lines > 0,
                           ppl_protocol=PerplexityProtocol(name="paper", n_lines=max(1, args.ppl_lines)),
                           wikitext=wikitext, batch_size=args.batch_size, save_every=args.save_every,
                           **wild_options(args))
    order_cases(cases, cfg.total, cfg.shuffle_seed)  # T larger than the selection: one line, before loading
    model, tok = load_from_args(args)
    run_dir = run_sequential(model, tok, cases, cfg, args.out,
                             data_info={"path": str(data), "sha256": file_sha256(data), "n_selected": len(cases),
                                        "limit": args.limit, "start": args.start, "case_ids": args.case_ids},
                             model_name=args.model, progress=not args.no_progress)
    print(f"results: {run_dir}")
    return 0



# length: the command's argument checks, in the order the options are documented, then the dispatch to the single,
#   sequential or zsRE/KnowEdit run
def run(args: argparse.Namespace) -> int:
    for flag, v, lo in (
        ("--ppl-every", args.ppl_every, 0),
        ("--batch-size", args.batch_size, 1),
        ("--score-records", args.score_records, 1),
        ("--start", args.start, 0),
        ("--procs", args.procs, 1),
        ("--num-edits", args.num_edits, 1),
        ("--gen-records", args.gen_records, 1),
        ("--gen-every", args.gen_every, 1),
        ("--wild-max-new-tokens", args.wild_max_new_tokens, 1),
        ("--wild-records", args.wild_records, 1),
    ):
        if v < lo:
            raise ShiftEditError(f"{flag} must be >= {lo}, got {v}")
    if args.data is None:
        raise ShiftEditError("--data is required (a CounterFact JSON file, or 'download')")
    check_out_root(args.out, "--out")
    check_model_args(args)
    data = resolve_data(args.data)
    fmt = args.format or detect_format(read_json_records(data, unwrap="data"), data)
    if fmt != "counterfact":
        return run_facts(args, data, fmt)
    cases = load_counterfact(data, limit=args.limit, start=args.start, case_ids=parse_case_ids(args.case_ids))
    hparams = None
    if args.alg != "NONE":
        check_model_name(args.model)  # a misspelt alias is one line now, not "no shipped hparams"
        hparams = find_hparams(args.alg, args.model, args.hparams)
        if hparams is None:
            raise ShiftEditError(f"no shipped hparams for {args.alg} / {args.model}: pass --hparams FILE")
    elif args.hparams:
        raise ShiftEditError("--alg NONE takes no --hparams")
    wikitext = args.wikitext or default_wikitext()
    if args.sequential is not None:
        return run_sequential_args(args, cases, data, hparams, wikitext)
    if args.batch_edits != 1 or args.eval_at or args.shuffle_seed is not None:
        raise ShiftEditError("--batch-edits, --eval-at and --shuffle-seed need --sequential T")
    if args.ppl_every and wikitext is None:
        if importlib.util.find_spec("datasets") is None:
            raise ShiftEditError("--ppl-every needs --wikitext FILE or the datasets package")
    if args.wikitext is not None and not Path(args.wikitext).is_file():
        raise ShiftEditError(f"--wikitext {args.wikitext}: file not found")
    cfg = BenchConfig(alg=args.alg, hparams=hparams, seed=args.seed, skip_generation=args.skip_generation,
                      ppl_every=args.ppl_every, ppl_protocol=PerplexityProtocol(name=args.ppl_protocol),
                      wikitext=wikitext, batch_size=args.batch_size, score_records=args.score_records,
                      neighborhood_kl=not args.no_kl, num_edits=args.num_edits, gen_records=args.gen_records,
                      gen_every=args.gen_every, portability=args.portability, **wild_options(args))
    rank, world = shard_env()
    if args.procs > 1 and world == 1:
        procs = clamp_procs(args.procs, n_shares(len(cases), cfg))
        if procs > 1:
            return _launch(args.argv, procs)
    if world > 1 and args.device == "cuda":  # one GPU per process under accelerate launch / torchrun
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    model, tok = load_from_args(args)
    if hparams is not None:

        note = hparams_model_mismatch(hparams, model)
        if note and rank == 0:
            print(f"warning: {note}; results may not match the tuned protocol", file=sys.stderr)
    run_dir = run_bench(model, tok, cases, cfg, args.out,
                        data_info={"path": str(data), "sha256": file_sha256(data), "n_selected": len(cases),
                                   "limit": args.limit, "start": args.start, "case_ids": args.case_ids},
                        model_name=args.model, rank=rank, world_size=world, progress=not args.no_progress)
    if rank == 0:
        print(f"results: {run_dir}")
    return 0


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def clamp_procs(procs: int, shares: int) -> int:
    """``--procs`` bounded by the cores and by the shares of records (more processes would each load the model
    for nothing); one warning when it is lowered."""
    cores = available_cores()
    use = max(1, min(procs, cores, shares))
    if use < procs:
        why = " and ".join(
            w for w, n in ((f"{cores} core(s)", cores), (f"{shares} share(s) of records", shares)) if n < procs
        )
        print(f"warning: --procs {procs}: this run has {why}; running {use} process{'es' if use > 1 else ''}",
              file=sys.stderr)
    return use


def _launch(argv: list[str], procs: int) -> int:
    """Re-run this command as ``procs`` shard processes (RANK/WORLD_SIZE), cores split evenly."""
    threads = max(1, available_cores() // procs)
    env = {**os.environ, "WORLD_SIZE": str(procs), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    children = [
        subprocess.Popen([sys.executable, "-m", "shift_edit", *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(procs)
    ]
    codes = [c.wait() for c in children]
    bad = [c for c in codes if c != 0]
    return bad[0] if bad else 0
