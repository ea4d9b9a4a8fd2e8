"""FT / FT_L with and without the frozen prefix (blocks below the lowest trained layer run once per edit),
measured in one run on the same records, interleaved; the deltas are checked to be equal bit for bit.

Prints, per algorithm, the median edit-compute time both ways and the speed-up. Usage::

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. python eval/bench_ft_prefix.py --n 5 --threads 1
    ... --algs FT,FT_L --out eval/reports/baselines/ft_prefix.json

FT_L's shipped layer is 0: nothing below it to freeze, so its two timings are the same work (a control).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.algorithms.gradient.ft import finetune
from shift_edit.core.requests import make_request
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.studies.counterfact_records import load_records

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5, help="timed records, after one warm-up")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--algs", default="FT,FT_L",
                    help="comma list of FT, FT_L or ALG:variant (hparams/ALG/smollm2-135m[-variant].yaml)")
    ap.add_argument("--out", default=None, help="also write the numbers and the protocol to this JSON file")
    args = ap.parse_args()
    try:
        hps = {}
        for spec in args.algs.split(","):
            alg, _, variant = spec.partition(":")
            if alg not in ("FT", "FT_L"):
                raise ValueError(f"--algs: {alg} is not FT or FT_L")
            path = REPO / "hparams" / alg / (f"smollm2-135m-{variant}.yaml" if variant else "smollm2-135m.yaml")
            hps[spec] = se.load_hparams(path).replace(skip_if_predicted=False)
        records = load_records(n=args.n + 1)
    except (ValueError, OSError, se.ShiftEditError) as exc:
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    model, tok = se.load_model("smollm2-135m")
    times = {spec: {"prefix": [], "full": []} for spec in hps}
    for i, rec in enumerate(records):
        reqs = [make_request(rec)]
        for spec, hp in hps.items():
            eps = getattr(hp, "norm_constraint", None)
            got = {}
            for way in ("full", "prefix"):
                t0 = time.perf_counter()
                got[way] = finetune(model, tok, reqs, hp, eps, frozen_prefix=way == "prefix")
                if i:
                    times[spec][way].append(time.perf_counter() - t0)
            same = all(torch.equal(a.dense, b.dense) for a, b in zip(got["full"].deltas, got["prefix"].deltas))
            if not same or got["full"].info != got["prefix"].info:
                raise SystemExit(f"{spec}: the deltas differ on record {rec.get('case_id')}")
    rows = {}
    print(f"SmolLM2-135M, {args.n} records (one warm-up before), {args.threads} thread(s), deltas equal bit for bit")
    print(f"{'alg':10} {'layers':10} {'full s':>8} {'prefix s':>9} {'speed-up':>9}")
    for spec, t in times.items():
        full, pre = statistics.median(t["full"]), statistics.median(t["prefix"])
        rows[spec] = {"layers": hps[spec].layers, "full_s": full, "prefix_s": pre, "speedup": full / pre}
        print(f"{spec:10} {str(hps[spec].layers):10} {full:8.2f} {pre:9.2f} {full / pre:8.2f}x")
    if args.out:
        atomic_write_json(
            args.out,
            {
                "protocol": {
                    "model": "smollm2-135m",
                    "records": f"1..{args.n} (0: warm-up)",
                    "threads": args.threads,
                    "hparams": {s: h.to_dict() for s, h in hps.items()},
                    "timed": "finetune() compute, median per edit",
                },
                "results": rows,
                "provenance": provenance(model),
            },
        )


if __name__ == "__main__":
    main()
