"""Peak memory of one edit per algorithm: each in its own process, beside its per-edit time (issue 33, target 6).

For every algorithm, a fresh Python process loads SmolLM2-135M, runs one forward pass (so that every parameter page is
resident), reads (or computes, then caches) the algorithm's statistics (its ``prime``), then makes ``--n`` single
edits of the first CounterFact records with the shipped hparams, each undone before the next. It reports the resident
memory after the load, after the statistics, and the process's peak (``ru_maxrss``), so that what an edit adds on top
of the loaded model is visible apart from what the interpreter and the libraries hold. Run the statistics once
beforehand (``shift-edit stats`` or a first run of this script): computing them is not an edit's cost.

Usage::

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. python eval/bench_edit_memory.py --n 3 --threads 1 \\
        --out eval/reports/speed/edit_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def _rss_now() -> int:
    """The process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))


def child(alg: str, n: int, threads: int) -> dict:
    """One algorithm's numbers, measured in this (fresh) process."""
    import torch

    import shift_edit as se
    from shift_edit.core.errors import EditRefusedError
    from shift_edit.core.registry import get_algorithm
    from shift_edit.core.shipped_hparams import shipped_hparams
    from shift_edit.studies.counterfact_records import load_records

    torch.set_num_threads(threads)
    imported = _rss_now()
    records = load_records(n=n)
    hp_path = shipped_hparams(alg, "smollm2-135m")
    hp = se.load_hparams(hp_path).replace(skip_if_predicted=False)
    model, tok = se.load_model("smollm2-135m")
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    loaded = _rss_now()
    spec = get_algorithm(alg)
    if spec.prime is not None:
        spec.prime(model, tok, hp)
    primed = _rss_now()
    times = []
    for rec in records:
        t0 = time.perf_counter()
        try:
            se.edit(model, tok, rec, hp).undo()
        except EditRefusedError:
            pass
        times.append(time.perf_counter() - t0)
    return {"alg": alg, "hparams": str(Path(hp_path).relative_to(REPO)), "imported": imported, "loaded": loaded,
            "primed": primed, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
            "edit_s": times, "median_edit_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algs", default=None, help="comma list (default: every registered algorithm)")
    ap.add_argument("--n", type=int, default=3, help="single edits per algorithm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the numbers and the protocol to this JSON file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.threads)))
        return
    import shift_edit as se
    from shift_edit.files.io import atomic_write_json, provenance

    algs = args.algs.split(",") if args.algs else se.algorithm_names()
    unknown = sorted(set(algs) - set(se.algorithm_names()))
    if unknown:
        ap.error(f"unknown algorithm(s) {unknown}; registered: {se.algorithm_names()}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for alg in algs:
        out = subprocess.run([sys.executable, __file__, "--child", alg, "--n", str(args.n), "--threads",
                              str(args.threads)], env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"{alg} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    size = rows[0]["parameters"]
    print(f"SmolLM2-135M, parameters {size / MIB:.0f} MiB; {args.n} single edits per algorithm, {args.threads} "
          f"thread(s); MiB resident (x the parameters)")
    print(f"{'algorithm':14s} {'imported':>9s} {'loaded':>9s} {'+statistics':>12s} {'peak':>14s} "
          f"{'edit adds':>10s} {'s/edit':>7s}")
    for r in rows:
        print(f"{r['alg']:14s} {r['imported'] / MIB:9.0f} {r['loaded'] / MIB:9.0f} {r['primed'] / MIB:12.0f} "
              f"{r['peak'] / MIB:7.0f} ({r['peak'] / size:.2f}x) {(r['peak'] - r['primed']) / MIB:10.0f} "
              f"{r['median_edit_s']:7.2f}")
    if args.out:
        atomic_write_json(Path(args.out), {
            "what": "resident memory of a fresh process per algorithm: after import, after loading the model and one "
                    "forward pass, after the algorithm's statistics, and its peak over single edits (ru_maxrss)",
            "model": "smollm2-135m", "threads": args.threads, "n_edits": args.n, "rows": rows,
            "load_average_1min": os.getloadavg()[0], "provenance": provenance(),
        })


if __name__ == "__main__":
    main()
