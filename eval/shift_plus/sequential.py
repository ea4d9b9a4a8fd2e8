"""Sequential (lifelong) SHIFT_PLUS on SmolLM2: N edits one after another through plain
``shift_edit.edit(..., memory=mem)``, none undone; retention measured at checkpoints.

At each checkpoint k: strict top-1 efficacy (MEMIT family) of the rewrite prompt of every record
edited so far ("hold"), and on the first ``--eval-records`` edited records both metric families
over all their prompt groups (paraphrase / rephrase, neighborhood) plus WikiText perplexity
(paper protocol, ``--ppl-lines`` x ``--ppl-tokens``) relative to the unedited model.

    python eval/shift_plus/sequential.py --n 1000 --data counterfact-easyedit-edit.json \\
        --out eval/reports/shift_plus/sequential.json
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
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.bench.metrics import CaseScorer, metrics_from_scores
from shift_edit.bench.wikitext import PerplexityProtocol, perplexity, read_wikitext_lines
from shift_edit.core.memory import EditMemory
from shift_edit.core.requests import encode_prompt, encode_target
from shift_edit.files.io import atomic_write_json
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.scoring import pad_id_of, score_token_continuations

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def hold_rate(model, tok, cases) -> float:
    pairs = [
        (encode_prompt(tok, c.request.text), encode_target(tok, c.request.text, c.request.target_new)) for c in cases
    ]
    scores = score_token_continuations(model, pairs, pad_id=pad_id_of(tok), batch_size=64)
    return 100 * sum(s.all_correct for s in scores) / len(scores)


def group_metrics(model, tok, cases) -> dict:
    acc: dict[str, list[float]] = {}
    for c in cases:
        sc = CaseScorer(tok, c)
        m = metrics_from_scores(sc.scores(sc.logits(model)))
        for fam in ("rome", "top1"):
            for k, v in m[fam].items():
                acc.setdefault(f"{fam}.{k}", []).append(v)
    return {k: 100 * statistics.mean(v) for k, v in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--data", default="counterfact-easyedit-edit.json")
    ap.add_argument("--hparams",
                    default=str(Path(__file__).resolve().parents[2] / "hparams" / "SHIFT_PLUS" / "smollm2-135m.yaml"))
    ap.add_argument("--override", default="{}", help="JSON of hparams fields to override")
    ap.add_argument("--checkpoints", default="10,50,100,250,500,1000")
    ap.add_argument("--eval-records", type=int, default=50)
    ap.add_argument("--ppl-lines", type=int, default=10)
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = se.load_model("smollm2-135m")
    cases = load_counterfact(DATA / args.data, limit=args.n)
    hp = se.load_hparams(args.hparams)
    over = json.loads(args.override)
    if over:
        params = {**hp.to_dict(), **over}
        hp = type(hp)(**{k: v for k, v in params.items() if k not in ("alg_name", "shift_edit_version")})
    proto = PerplexityProtocol(n_lines=args.ppl_lines, max_tokens=args.ppl_tokens)
    lines = read_wikitext_lines(str(DATA / "wikitext-2-raw-v1" / "wiki.test.nonblank.raw"))
    base_ppl = perplexity(model, tok, lines, proto)
    probe = cases[: args.eval_records]
    before = group_metrics(model, tok, probe)
    checkpoints = sorted({int(x) for x in args.checkpoints.split(",") if int(x) <= len(cases)} | {len(cases)})
    mem = EditMemory()
    adapter = ModelAdapter(model)  # every FF2 weight, kept to report how far the edits moved it
    edited = {p: model.get_parameter(p).detach().clone()
              for p in (adapter.param_name(adapter.ff2_name(layer)) for layer in range(len(adapter.blocks())))}
    rows, times, passes, skipped, pushes = [], [], [], 0, []
    for i, case in enumerate(cases, 1):
        t = time.perf_counter()
        res = se.edit(model, tok, case.request, hp, memory=mem)
        times.append(time.perf_counter() - t)
        skipped += bool(res.skipped[0])
        passes.append(res.info[0].get("forward_passes", 0) if res.info else 0)
        if res.info and res.info[0].get("push") is not None:
            pushes.append(res.info[0]["push"])
        if i in checkpoints:
            row = {"edits": i, "hold_top1": hold_rate(model, tok, cases[:i]),
                   "ppl_ratio": perplexity(model, tok, lines, proto) / base_ppl,
                   "probe": group_metrics(model, tok, probe[: min(i, len(probe))]),
                   "memory_keys": len(mem), "skipped_so_far": skipped,
                   "push_median": statistics.median(pushes) if pushes else None,
                   "delta_fro": {n: round(float((p - edited[n]).norm()), 2) for n, p in model.named_parameters()
                                 if n in edited and not torch.equal(p, edited[n])},
                   "edit_time_median_s": statistics.median(times)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            atomic_write_json(Path(args.out), {
                "protocol": f"SmolLM2-135M-Instruct, first {len(cases)} records of {args.data}, edits applied one "
                f"after "
                            "another with shift_edit.edit(..., memory=EditMemory()), never undone. hold_top1: strict "
                            "top-1 (MEMIT family) of target_new on the rewrite prompt of every record edited so far. "
                            f"probe: both metric families on the first {len(probe)} records (only those already "
                            f"edited). ppl_ratio: WikiText paper protocol {args.ppl_lines} lines x {args.ppl_tokens} "
                            "tokens, edited / unedited.",
                "hparams": hp.to_dict(), "unedited_probe": before, "base_ppl": base_ppl,
                "forward_passes_mean": statistics.mean(passes), "checkpoints": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
