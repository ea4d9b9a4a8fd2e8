"""Scoring cost per record of zsRE and KnowEdit beside CounterFact's (issue 32, item 5 "Speed").

What a single-edit benchmark run spends per record outside the edit itself, measured on the unedited model
(the cost does not depend on the edit; the harness runs the same passes on the edited one):

- ``pre``: the unedited measurement taken before each edit -- CounterFact: the neighborhood pass that keeps the KL
  reference; KnowEdit: EasyEdit's pre-edit measurement (its locality tokens are the reference); zsRE: none.
- ``post``: the measurement after the edit -- CounterFact: every (prompt, new/true) pair in shared batches and the
  ROME/top-1 metrics; zsRE: MEMIT's token-prefix pairs of src, rephrase and the NQ question; KnowEdit: EasyEdit's
  rewrite / rephrase / portability / locality token accuracies.
- KnowEdit's Fluency (a 100-token top-5 sample per record) on its first ``--fluency-records`` records, apart.
  CounterFact's generation metrics (n-gram entropy, WILD) are not timed here.

Usage: PYTHONPATH=. python eval/bench_fact_scoring.py [--records 30] [--threads 1] [--fluency-records 3]
One run, records 1..N of each file (record 0 is the warm-up); prints s/record and the ratio to CounterFact.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

WALL: dict[str, float] = {}


def _timed(fn, items, key: str) -> tuple[float, list]:
    """CPU seconds of the process (one thread: the compute, robust to other jobs on the machine) over
    ``fn`` on every item; the wall seconds go to ``WALL[key]``."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = [fn(x) for x in items]
    WALL[key] = time.perf_counter() - t0
    return time.process_time() - c0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fluency-records", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import shift_edit as se
    from shift_edit.bench import load_counterfact, metrics_from_scores
    from shift_edit.bench.fact_metrics import (
        easyedit_post,
        easyedit_pre,
        zsre_pairs,
        zsre_scores,
    )
    from shift_edit.bench.facts import load_facts
    from shift_edit.bench.metrics import CaseScorer
    from shift_edit.files.data_files import require_data

    model, tok = se.load_model(args.model)
    model.eval()
    n = args.records
    rows = []  # (name, n, pre s/record, post s/record, scored sequences per record or None)

    cases = load_counterfact(require_data("counterfact-subset"), limit=n + 1)

    def cf_pre(c):
        scorer = CaseScorer(tok, c)
        return scorer.neighborhood_logprobs(scorer.logits(model, parts=("near",)))

    def cf_post(c):
        scorer = CaseScorer(tok, c)
        return metrics_from_scores(scorer.scores(scorer.logits(model)))

    with torch.no_grad():
        cf_pre(cases[0]), cf_post(cases[0])  # warm-up
        t_pre, _ = _timed(cf_pre, cases[1:], "cf pre")
        t_post, _ = _timed(cf_post, cases[1:], "cf post")
    seqs = sum(len(CaseScorer(tok, c).parts[p].pairs) for c in cases[1:] for p in CaseScorer.PARTS) / n
    rows.append(("counterfact (subset837)", n, t_pre / n, t_post / n, seqs))

    facts = load_facts(require_data("zsre"), limit=n + 1)
    with torch.no_grad():
        zsre_scores(model, tok, [zsre_pairs(tok, facts[0])])
        t_post, _ = _timed(lambda c: zsre_scores(model, tok, [zsre_pairs(tok, c)]), facts[1:], "zsre post")
    seqs = sum(len(g) for c in facts[1:] for g in zsre_pairs(tok, c)) / n
    rows.append(("zsre (mend-eval-portability1037)", n, 0.0, t_post / n, seqs))

    fluency = []
    for name in ("knowedit-zsre", "knowedit-recent", "knowedit-counterfact"):
        facts = load_facts(require_data(name), limit=n + 1)
        with torch.no_grad():
            easyedit_post(model, tok, facts[0], easyedit_pre(model, tok, facts[0]))
            t_pre, pres = _timed(lambda c: easyedit_pre(model, tok, c), facts[1:], name + " pre")
            t_post, _ = _timed(lambda cp: easyedit_post(model, tok, cp[0], cp[1]), list(zip(facts[1:], pres)),
                               name + " post")
            k = min(args.fluency_records, n)
            if k:
                t_flu, _ = _timed(lambda cp: easyedit_post(model, tok, cp[0], cp[1], fluency=True),
                                  list(zip(facts[1 : k + 1], pres[:k])), name + " fluency")
                fluency.append((name, k, t_flu / k - t_post / n))
        rows.append((name, n, t_pre / n, t_post / n, None))

    base = rows[0][2] + rows[0][3]
    print(f"model {args.model}, CPU, {args.threads} thread(s), one run, records 1..{n} of each file (record 0 "
          f"warm-up), "
          f"unedited model; CPU s/record (process time)")
    print(f"{'data set':34s} {'pre':>8s} {'post':>8s} {'total':>8s} {'x CounterFact':>14s} {'seqs/record':>12s}")
    for name, _, pre, post, seqs in rows:
        s = f"{seqs:12.1f}" if seqs is not None else f"{'-':>12s}"
        print(f"{name:34s} {pre:8.3f} {post:8.3f} {pre + post:8.3f} {(pre + post) / base:13.2f}x {s}")
    for name, k, t in fluency:
        print(f"{name} Fluency (generation, {k} records): {t:.2f} s/record on top of post")
    print(f"wall time of all the timed loops: {sum(WALL.values()):.1f} s (CPU: the process time above; the machine "
          "was shared, so wall > CPU)")
    print("seqs/record: (prompt, target) sequences scored per record (CounterFact: new and true per prompt; "
          "zsRE: one re-tokenised prefix per answer token of src, rephrase and the NQ question)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
