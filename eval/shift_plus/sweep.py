"""SHIFT_PLUS sweep on CounterFact (SmolLM2): single edits, one hparams variant after another.

Each variant edits the first ``--n`` records of the ROME-format file one at a time (undone
bit-exactly before the next) through the benchmark's own ``evaluate_batch`` (both metric
families, neighborhood KL) and measures WikiText perplexity every ``--ppl-every``-th record
(``--ppl-lines`` lines x ``--ppl-tokens`` tokens, "paper" protocol). Output: one JSON line per
variant with the means, the model calls per edit and the median edit time over the median
time of one forward pass of the same prompts.

    python eval/shift_plus/sweep.py --n 40 --out eval/reports/shift_plus/sweep40.jsonl \\
        --variant base '{}' --variant nocontrast '{"n_contrast": 0}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.algorithms.shift.shift_plus import ShiftPlusHyperParams
from shift_edit.bench.bench_config import BenchConfig
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.bench.runner import RunState, evaluate_batch
from shift_edit.bench.wikitext import PerplexityProtocol, perplexity, read_wikitext_lines
from shift_edit.core.requests import encode_prompt
from shift_edit.model.scoring import pad_batch, pad_id_of

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HPARAMS = Path(__file__).resolve().parents[2] / "hparams" / "SHIFT_PLUS" / "smollm2-135m.yaml"


def forward_time(model, tok, prompts: list[str]) -> float:
    """Median seconds of one forward pass of one prompt."""
    times = []
    with torch.no_grad():
        for p in prompts:
            ids, mask = pad_batch([encode_prompt(tok, p)], pad_id_of(tok), next(model.parameters()).device)
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_variant(model, tok, cases, hp, ppl_lines, proto, ppl_every: int, base_ppl: float) -> dict:
    # teacher-forced families only (as when the sweep was run; no free generation)
    cfg = BenchConfig(alg=hp.ALG_NAME, hparams=hp, skip_generation=True, neighborhood_kl=True, skip_wild=True)
    rows, ppls, passes, times = [], [], [], []
    state = RunState()
    for i, case in enumerate(cases):
        rec = evaluate_batch(model, tok, [case], cfg, positions=[i], ppl_lines=None, state=state)[0]
        rows.append(rec)
        info = rec["edit"].get("info") or {}
        if rec["edit"].get("applied"):
            passes.append(info.get("forward_passes", 0))
            times.append(rec["time_s"]["edit"])
        if ppl_every and i % ppl_every == 0:
            res = se.edit(model, tok, case.request, hp)
            try:
                ppls.append(perplexity(model, tok, ppl_lines, proto) / base_ppl)
            finally:
                res.undo()

    def mean(path):
        vals = []
        for r in rows:
            d = r["metrics"]
            for k in path:
                d = d.get(k) if isinstance(d, dict) else None
            if d is not None:
                vals.append(float(d))
        return 100 * sum(vals) / len(vals) if vals else None

    out = {
        "efficacy_top1": mean(("top1", "rewrite_acc")), "paraphrase_top1": mean(("top1", "paraphrase_acc")),
        "neighborhood_top1": mean(("top1", "neighborhood_acc")),
        "ES": mean(("rome", "rewrite_success")), "PS": mean(("rome", "paraphrase_success")),
        "NS": mean(("rome", "neighborhood_success")),
        "neighborhood_kl": (mean(("neighborhood_kl", "mean")) or 0) / 100,
        "ppl_ratio_median": statistics.median(ppls) if ppls else None,
        "ppl_ratio_max": max(ppls) if ppls else None,
        "forward_passes_mean": statistics.mean(passes) if passes else None,
        "forward_passes_max": max(passes) if passes else None,
        "edit_time_median_s": statistics.median(times) if times else None,
        "n_applied": len(times),
        "reached_margin": sum(bool((r["edit"].get("info") or {}).get("reached_margin")) for r in rows),
    }
    es, ps, ns = out["ES"], out["PS"], out["NS"]
    out["S"] = 3 / (1 / es + 1 / ps + 1 / ns) if min(es, ps, ns) > 0 else 0.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hparams", default=str(HPARAMS), help="base hparams YAML the variants override")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    ap.add_argument("--ppl-every", type=int, default=5)
    ap.add_argument("--ppl-lines", type=int, default=10)
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curve", default=None, help="tag the rows as one curve of the frontier plot (report.py)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = se.load_model("smollm2-135m")
    cases = load_counterfact(DATA / "counterfact-original-format-subset837.json", start=args.start, limit=args.n)
    proto = PerplexityProtocol(n_lines=args.ppl_lines, max_tokens=args.ppl_tokens)
    ppl_lines = read_wikitext_lines(str(DATA / "wikitext-2-raw-v1" / "wiki.test.nonblank.raw"))
    base_ppl = perplexity(model, tok, ppl_lines, proto)
    t_fwd = forward_time(model, tok, [c.request.text for c in cases[:20]])
    base = se.load_hparams(args.hparams).to_dict() if Path(args.hparams).is_file() else {"layers": [26]}
    for name, override in args.variant:
        params = {**base, **json.loads(override)}
        params = {k: v for k, v in params.items() if k not in ("alg_name", "shift_edit_version")}
        hp = ShiftPlusHyperParams(**params)
        t0 = time.perf_counter()
        res = run_variant(model, tok, cases, hp, ppl_lines, proto, args.ppl_every, base_ppl)
        res.update(name=name, override=json.loads(override), n=len(cases), start=args.start, curve=args.curve,
                   forward_time_s=t_fwd, base_ppl=base_ppl, wall_s=time.perf_counter() - t0,
                   edit_time_ratio=(res["edit_time_median_s"] or 0) / t_fwd,
                   protocol="SmolLM2-135M-Instruct, counterfact-original-format-subset837.json, single edits; "
                            "top1 = strict top-1 (MEMIT family), ES/PS/NS = ROME family; perplexity ratio "
                            f"edited/unedited, paper protocol {args.ppl_lines} lines x {args.ppl_tokens} tokens")
        with open(args.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                          if k not in ("protocol",)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
