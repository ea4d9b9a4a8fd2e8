"""Batched vs per-prompt scoring of CounterFact records on SmolLM2: speed ratio and identical values.

Per-prompt: one forward pass per (prompt, target) pair, batch 1 (what a naive harness does).
Batched: the harness's path -- pairs whose input is a prefix of another's read off one pass,
the rest right-padded into length-bucketed batches, the head applied only where needed.

Usage: PYTHONPATH=. python eval/bench_scoring.py [--records 10] [--threads 2]
Prints one run's timings and the ratio (target: batched >= 4x faster than per-prompt).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import shift_edit as se
    from shift_edit.bench import load_counterfact, metrics_from_scores, score_case
    from shift_edit.files.data_files import require_data

    data = require_data("counterfact-subset", args.data)
    model, tok = se.load_model(args.model)
    cases = load_counterfact(data, limit=args.records)
    score_case(model, tok, cases[0], batch_size=64)  # warm-up
    t0 = time.perf_counter()
    batched = [score_case(model, tok, c, batch_size=64) for c in cases]
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [score_case(model, tok, c, batch_size=1, share_prefixes=False) for c in cases]
    t_s = time.perf_counter() - t0
    max_diff, same = 0.0, True
    for a, b in zip(batched, single):
        ma, mb = metrics_from_scores(a), metrics_from_scores(b)
        same &= all(ma[f] == mb[f] for f in ("top1", "top1_first"))
        same &= all(ma["rome"][k] == mb["rome"][k] for k in ma["rome"] if k.endswith("_success"))
        same &= all(abs(ma["rome"][k] - mb["rome"][k]) < 1e-4 for k in ma["rome"])
        for g in a:
            for (n1, t1), (n2, t2) in zip(a[g], b[g]):
                max_diff = max(max_diff, float((n1.token_nll - n2.token_nll).abs().max()),
                               float((t1.token_nll - t2.token_nll).abs().max()))
    n_seq = sum(2 * sum(len(v) for v in a.values()) for a in batched)
    print(f"model {args.model}, {len(cases)} records, {n_seq} (prompt, target) sequences, {args.threads} thread(s)")
    print(f"per-prompt: {t_s:.2f} s   batched (64): {t_b:.2f} s   speed-up: {t_s / t_b:.2f}x (target >= 4x)")
    print(f"identical ES/PS/NS and top-1 values (magnitudes within 1e-4): {same}; max |NLL difference|: {max_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
