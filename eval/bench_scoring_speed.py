"""The single-edit benchmark's scoring per record: each record alone (the reference path) vs records' unedited
passes in shared batches (``--score-records K``, issue 33 target 3), same records, same values.

What is timed is what ``shift-edit bench`` spends per record outside the edit and generation: the passes on the
unedited model (``prepare``: the unedited row's whole measurement; before an edit, the neighborhood distributions
of the KL and the input of the first edited block) and the measurement of the edited model (``measure``: the
blocks from the edited one on, the metrics). Both paths run ``shift_edit.bench.runner.evaluate_batch`` on the
same records, interleaved window by window (K records of one path, then the same K of the other) so machine load
hits both alike; the timings are the harness's own ``time_s`` fields (wall clock), the edit's time is listed apart
(the same work in both). Record 0 is the warm-up (and each path's one-off check of the resume shortcut).

For scale it also prints the matmul work of one record's scoring on the unedited model (every planned token through
the blocks, the head at the scored positions) and this core's best fp32 matmul rate (an MLP-shaped product, 1024 rows):
their quotient is the least time a full pass of a record can take here.

The values are compared record by record: every ES/PS/NS decision and strict / first-token top-1 decision, the
max |difference| of the mean NLLs (and the per-prompt neighborhood KL).

Usage::

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. python eval/bench_scoring_speed.py --records 100 --threads 1 \\
        [--algs NONE,SHIFT,SHIFT@5] [--score-records 16] [--profile 15] [--out eval/reports/speed/scoring.json]

``ALG@L``: ALG's shipped hparams with ``layers: [L]`` (SHIFT@5 edits as early as ROME and SHIFT_SUBJECT do on
SmolLM2, so the edited pass re-runs 25 of 30 blocks, at a fraction of their edit time).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import sys
import time
from pathlib import Path

import torch


def _decisions(m: dict) -> dict:
    return {"rome": {k: v for k, v in m["rome"].items() if k.endswith("_success")}, "top1": m["top1"],
            "top1_first": m["top1_first"], "top1_correct": m["top1_correct"]}


def _compare(old: list[dict], new: list[dict]) -> dict:
    """Record by record: decisions that differ, the largest NLL and KL differences."""
    flips, nll, kl = 0, 0.0, 0.0
    for a, b in zip(old, new, strict=True):
        ma, mb = a["metrics"], b["metrics"]
        flips += _decisions(ma) != _decisions(mb)
        for g in ma["nll"]:
            for x, y in zip(ma["nll"][g], mb["nll"][g], strict=True):
                nll = max(nll, abs(x["target_new"] - y["target_new"]), abs(x["target_true"] - y["target_true"]))
        if "neighborhood_kl" in ma:
            kl = max([kl] + [abs(x - y) for x, y in zip(ma["neighborhood_kl"]["per_prompt"],
                                                        mb["neighborhood_kl"]["per_prompt"], strict=True)])
    return {"records_with_a_different_decision": flips, "max_abs_nll_difference": nll,
            "max_abs_kl_difference": kl}


def _floor(model, tok, cases) -> dict:
    """GFLOP of one record's scoring passes on the unedited model, and this core's fp32 matmul GFLOP/s."""
    from shift_edit.bench.metrics import CaseScorer

    body = sum(p.numel() for m in _blocks(model) for p in m.parameters())
    tokens = positions = 0
    for c in cases:
        for part in CaseScorer(tok, c).parts.values():
            tokens += sum(len(x) for x in part.plan.seqs)
            positions += sum(len(x) for x in part.plan.positions)
    head = model.get_output_embeddings().weight.numel()
    gflop = 2 * (body * tokens + head * positions) / len(cases) / 1e9
    d = model.config.hidden_size
    x, w = torch.randn(1024, d), torch.randn(4 * d, d)
    best = float("inf")
    for _ in range(10):  # the best of 10 (the machine may be shared: its peak, not its average)
        t0 = time.perf_counter()
        for _ in range(5):
            torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    rate = 5 * 2 * x.shape[0] * w.numel() / best / 1e9
    return {"gflop_per_record": gflop, "tokens_per_record": tokens / len(cases), "matmul_gflops": rate,
            "least_s_per_record": gflop / rate}


def _blocks(model):
    from shift_edit.model.architectures import ModelAdapter

    return list(ModelAdapter(model).blocks())


def _profiled(profiles: dict | None, key: tuple[str, str], fn, *args):
    """``fn(*args)``, under the profile ``profiles[key]`` when profiling."""
    if profiles is None:
        return fn(*args)
    prof = profiles.setdefault(key, cProfile.Profile())
    prof.enable()
    try:
        return fn(*args)
    finally:
        prof.disable()


def _time(recs: list[dict]) -> dict:
    return {k: sum(r["time_s"][k] for r in recs) / len(recs) for k in ("prepare", "measure", "edit")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100, help="timed records (1..N of the file; 0 is the warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--algs", default="NONE,SHIFT,SHIFT@5",
                    help="comma list; edits use the shipped hparams for the model (ALG@L: with layers [L])")
    ap.add_argument("--score-records", type=int, default=16, help="records per packed window (the bench's default)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="CounterFact file (default: the 837-record subset)")
    ap.add_argument("--out", default=None, help="also write the numbers and the protocol to this JSON file")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print each path's N functions of most own time (cProfile; slows both alike)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import shift_edit as se
    from shift_edit.bench import BenchConfig, load_counterfact
    from shift_edit.bench.prepare import prepare_records
    from shift_edit.bench.runner import RunState, evaluate_batch
    from shift_edit.cli.common import find_hparams
    from shift_edit.files.data_files import require_data
    from shift_edit.files.io import atomic_write_json, provenance

    data = require_data("counterfact-subset", args.data)
    model, tok = se.load_model(args.model)
    model.eval()
    cases = load_counterfact(data, limit=args.records + 1)
    k = args.score_records
    results = {}
    profiles: dict | None = {} if args.profile else None
    for spec in args.algs.split(","):
        alg, _, layer = spec.partition("@")
        hp = None if alg == "NONE" else find_hparams(alg, args.model, None)
        if layer:
            hp = dataclasses.replace(hp, layers=[int(layer)])
        cfg = {n: BenchConfig(alg=alg, hparams=hp, skip_generation=True, skip_wild=True, score_records=n)
               for n in (1, k)}
        states = {1: RunState(), k: RunState()}

        def alone(batch, n0):
            return [evaluate_batch(model, tok, [c], cfg[1], positions=[n0 + i], ppl_lines=None, state=states[1])[0]
                    for i, c in enumerate(batch)]

        def packed(batch, n0):
            t0 = time.perf_counter()
            preps = prepare_records(model, tok, batch, [n0 + i for i in range(len(batch))], cfg[k])
            per = (time.perf_counter() - t0) / len(batch)
            return [evaluate_batch(model, tok, [c], cfg[k], positions=[n0 + i], ppl_lines=None, state=states[k],
                                   prepared=[p], prepare_s=per)[0] for i, (c, p) in enumerate(zip(batch, preps))]

        with torch.no_grad():
            alone(cases[:1], 0), packed(cases[:1], 0)  # warm-up; each path's one-off resume check
            old, new = [], []
            for w in range(1, len(cases), k):
                batch = cases[w : w + k]
                old += _profiled(profiles, (spec, "alone"), alone, batch, w)
                new += _profiled(profiles, (spec, "packed"), packed, batch, w)
        t_old, t_new = _time(old), _time(new)
        s_old, s_new = t_old["prepare"] + t_old["measure"], t_new["prepare"] + t_new["measure"]
        results[spec] = {"hparams": hp.to_dict() if hp is not None else None, "alone": t_old, "packed": t_new,
                        "scoring_s_per_record": {"alone": s_old, "packed": s_new}, "ratio": s_old / s_new,
                        "equality": _compare(old, new)}
    floor = _floor(model, tok, cases[1:])
    print(f"model {args.model}, CPU, {args.threads} thread(s), records 1..{args.records} of {Path(data).name} "
          f"(record 0 warm-up), packed windows of {k} records, load average {os.getloadavg()[0]:.1f}")
    print("scoring = prepare (unedited passes) + measure (edited passes, metrics); wall s/record from time_s")
    print(f"one record's passes on the unedited model: {floor['tokens_per_record']:.0f} tokens, "
          f"{floor['gflop_per_record']:.1f} GFLOP; fp32 matmul here {floor['matmul_gflops']:.0f} GFLOP/s -> at least "
          f"{floor['least_s_per_record']:.2f} s/record for a full pass")
    print(f"{'alg':8s} {'alone':>8s} {'packed':>8s} {'ratio':>7s}   {'(edit)':>7s}   equality (record by record)")
    for alg, r in results.items():
        e = r["equality"]
        print(f"{alg:8s} {r['scoring_s_per_record']['alone']:8.3f} {r['scoring_s_per_record']['packed']:8.3f} "
              f"{r['ratio']:6.2f}x   {r['alone']['edit']:7.3f}   decisions differ in "
              f"{e['records_with_a_different_decision']} records; max |NLL diff| {e['max_abs_nll_difference']:.1e}, "
              f"max |KL diff| {e['max_abs_kl_difference']:.1e}")
    for (spec, path), prof in (profiles or {}).items():
        print(f"\n== {spec}, {path}: the {args.profile} functions of most own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    if args.out:
        atomic_write_json(Path(args.out), {
            "what": "shift-edit bench scoring time per record (time_s prepare + measure, wall; the edit apart), each "
                    "record alone vs unedited passes of --score-records records in shared batches, interleaved "
                    "window by window on the same records; values compared record by record",
            "model": args.model, "threads": args.threads, "records": args.records, "score_records": k,
            "data": str(data), "case_ids": [c.case_id for c in cases[1:]],
            "load_average_1min": os.getloadavg()[0], "results": results, "full_pass_floor": floor,
            "provenance": provenance(model),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
