"""Cost per record of the WILD-style free-generation family against the teacher-forced scoring, on SmolLM2.

Usage: PYTHONPATH=. python eval/bench_wild_cost.py [--records 16] [--threads 1] [--data FILE]

Runs ``run_bench`` with SHIFT (shipped SmolLM2 hparams; its edit is cheap, so the numbers are the
metrics' cost) three times on the same records: WILD off, on (rewrite + paraphrase prompts), on with
neighborhood prompts. Prints, per record: the edit, the teacher-forced scoring (prepare + measure:
both families, KL), the WILD decoding, and the wall time of each run; then the gen_* means and one
continuation.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=None, help="CounterFact JSON (default: counterfact-subset)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--wild-records", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import shift_edit as se
    from shift_edit.bench import BenchConfig, file_sha256, load_counterfact, run_bench
    from shift_edit.bench.summarize import summarize_run
    from shift_edit.files.data_files import require_data

    data = require_data("counterfact-subset", args.data)
    model, tok = se.load_model("smollm2-135m")
    cases = load_counterfact(data, limit=args.records)
    hp = se.load_hparams(str(Path(__file__).resolve().parents[1] / "hparams" / "SHIFT" / "smollm2-135m.yaml"))
    print(f"SmolLM2-135M, SHIFT, {len(cases)} records of {Path(data).name}, {args.threads} thread(s), "
          f"{args.max_new_tokens} new tokens, {args.wild_records} records per decoding batch, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'WILD':<26} {'wall s/rec':>10} {'edit':>7} {'scoring':>8} {'wild':>7} {'wild/scoring':>13}")
    for name, kw in (("off", {"skip_wild": True}), ("rewrite + paraphrase", {}),
                     ("+ neighborhood", {"wild_neighborhood": True})):
        cfg = BenchConfig(alg="SHIFT", hparams=hp, skip_generation=True, wild_max_new_tokens=args.max_new_tokens,
                          wild_records=args.wild_records, **kw)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            run = run_bench(model, tok, cases, cfg, out, data_info={"path": str(data), "sha256": file_sha256(data)},
                            model_name="smollm2-135m", rank=0, world_size=1, progress=False)
            wall = (time.perf_counter() - t0) / len(cases)
            recs = [json.loads(p.read_text()) for p in sorted(run.glob("case_*.json"))]
            gen = {k: v["mean"] for k, v in summarize_run(run)["metrics"].items() if k.startswith("gen_")}
        n = len(recs)
        edit = sum(r["time_s"]["edit"] for r in recs) / n
        scoring = sum(r["time_s"]["prepare"] + r["time_s"]["measure"] for r in recs) / n
        wild = sum(r["time_s"].get("wild", 0.0) for r in recs) / n
        print(f"{name:<26} {wall:>10.2f} {edit:>7.2f} {scoring:>8.2f} {wild:>7.2f} {wild / scoring:>13.2f}  "
              + " ".join(f"{k} {v:.1f}" for k, v in gen.items()))
    w = recs[0]["metrics"]["wild"]
    print(f"e.g. case {recs[0]['case_id']} ({recs[0]['request']['target_true']!r} -> "
          f"{recs[0]['request']['target_new']!r}): "
          f"{recs[0]['request']['prompt'].format(recs[0]['request']['subject'])!r} + {w['texts']['rewrite'][0]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
