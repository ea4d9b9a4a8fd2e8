"""Time N CounterFact records with SHIFT on SmolLM2 (no generation by default), extrapolate to 1000.

Usage: PYTHONPATH=. python eval/bench_counterfact.py --hparams FILE [--records 5] [--threads 2] [--generation]
       [--procs 2]
Prints seconds per record, the extrapolation to 1000 records against the target (15 min without
generation, 60 min with), and peak RSS against the model's size (target <= 2x).
With ``--procs N`` it times the CLI (``shift-edit bench --procs N``, model loads included) instead;
each process then holds its own copy of the model.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hparams", required=True)
    ap.add_argument("--generation", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--gen-records", type=int, default=4, help="records per decoding batch (the bench's --gen-records)")
    args = ap.parse_args()
    if args.procs > 1:
        return _time_cli(args)
    torch.set_num_threads(args.threads)
    import shift_edit as se
    from shift_edit.bench import BenchConfig, file_sha256, load_counterfact, run_bench
    from shift_edit.files.data_files import require_data

    data = require_data("counterfact-subset", args.data)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, tok = se.load_model("smollm2-135m")
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cases = load_counterfact(data, limit=args.records)
    cfg = BenchConfig(alg="SHIFT", hparams=se.load_hparams(args.hparams), skip_generation=not args.generation,
                      gen_records=args.gen_records, skip_wild=True)  # WILD cost: eval/bench_wild_cost.py
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run_bench(model, tok, cases, cfg, out, data_info={"path": str(data), "sha256": file_sha256(data)},
                  model_name="smollm2-135m", rank=0, world_size=1, progress=False)
        dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per = dt / len(cases)
    target = 3600 if args.generation else 900
    print(f"SHIFT on smollm2-135m, {len(cases)} records, generation={'on' if args.generation else 'off'} "
          f"({args.gen_records} records per decoding batch), "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{per:.2f} s/record -> 1000 records: {per * 1000 / 60:.1f} min (target {target // 60} min): "
          f"ratio to target {per * 1000 / target:.2f}")
    print(f"model size {size_mb:.0f} MiB; peak RSS {peak:.0f} MiB = {peak / size_mb:.2f}x model "
          f"(before loading {rss0:.0f} MiB, after loading {rss_loaded:.0f} MiB; "
          f"peak minus interpreter baseline = {(peak - rss0) / size_mb:.2f}x model)")
    return 0


def _time_cli(args: argparse.Namespace) -> int:
    import subprocess

    from shift_edit.files.data_files import require_data

    data = require_data("counterfact-subset", args.data)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "shift_edit", "bench", "--alg", "SHIFT", "--model", "smollm2-135m",
               "--hparams", args.hparams, "--data", str(data), "--limit", str(args.records), "--out", out,
               "--procs", str(args.procs), "--no-progress", *([] if args.generation else ["--skip-generation"])]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
    per = dt / args.records
    target = 3600 if args.generation else 900
    print(f"SHIFT on smollm2-135m via `shift-edit bench --procs {args.procs}`, {args.records} records, "
          f"generation={'on' if args.generation else 'off'}, wall time {dt:.1f} s incl. model loads")
    print(f"{per:.2f} s/record -> 1000 records: {per * 1000 / 60:.1f} min (target {target // 60} min): "
          f"ratio to target {per * 1000 / target:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
