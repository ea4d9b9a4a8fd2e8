"""Per-edit wall time of SHIFT vs SGD vs ADAM vs FT on SmolLM2, measured in one run.

Every algorithm edits the same CounterFact records, interleaved record by record so
machine load affects all alike; each timed edit is ``shift_edit.edit`` (compute the
deltas + apply them) followed by ``undo()``. ``skip_if_predicted`` is off for all so
every algorithm does its full work. Prints median seconds per edit and the ratios
to SHIFT. Usage::

    SHIFT_EDIT_SHARED_DATA=/work/shared/data PYTHONPATH=. python eval/bench_edit_time.py --n 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.studies.data import load_records

REPO = Path(__file__).resolve().parents[1]


def hparams_for(alg: str, name: str):
    path = REPO / "hparams" / alg / f"{name}.yaml"
    if path.is_file():
        return se.load_hparams(path).replace(skip_if_predicted=False), str(path.relative_to(REPO))
    if alg == "SHIFT":  # this branch ships no SHIFT file: the paper's single-layer setting
        return se.ShiftHyperParams(layers=[15], eta=0.5, skip_if_predicted=False), "inline layers=[15] eta=0.5"
    raise SystemExit(f"missing {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="records (edits per algorithm)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--algs", default="SHIFT,SGD,ADAM,FT")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = se.load_model("smollm2-135m")
    algs = args.algs.split(",")
    hps = {a: hparams_for(a, "smollm2-135m") for a in algs}
    records = load_records(n=args.n + 1)
    times: dict[str, list[float]] = {a: [] for a in algs}
    steps: list[int] = []
    for i, rec in enumerate(records):
        for a in algs:
            t0 = time.perf_counter()
            res = se.edit(model, tok, rec, hps[a][0])
            dt = time.perf_counter() - t0
            res.undo()
            if i == 0:
                continue  # warm-up record, not timed
            times[a].append(dt)
            if a == "FT":
                steps.append(res.info[0]["steps"])
    print(f"SmolLM2-135M, CPU, {args.threads} thread(s), {args.n} CounterFact edits per algorithm "
          f"(records 1..{args.n} of the subset, record 0 as warm-up), skip_if_predicted off")
    med = {a: statistics.median(v) for a, v in times.items()}
    for a in algs:
        print(f"{a:6s} median {med[a] * 1e3:9.1f} ms/edit   ratio to SHIFT {med[a] / med['SHIFT']:7.1f}x   ({hps[a][1]})")
    if steps:
        print(f"FT optimiser steps per edit: median {statistics.median(steps)}, range {min(steps)}-{max(steps)}")
    if "FT" in med:
        verdict = "meets" if med["FT"] / med["SHIFT"] >= 50 else "misses"
        print(f"SHIFT is {med['FT'] / med['SHIFT']:.0f}x faster than FT ({verdict} the >= 50x target)")


if __name__ == "__main__":
    main()
