"""ROME (or MEMIT) efficacy on CounterFact records, strict top-1 (MEMIT / paper Table 6 family).

Each record is edited alone on the unedited model, scored (every target_new token must be the
argmax under teacher forcing on the rewrite prompt), then undone. Several layers = a layer sweep.

    SHIFT_EDIT_SHARED_DATA=/work/shared/data python eval/rome_efficacy.py --hparams hparams/ROME/smollm2-135m.yaml \
        --layers 4 8 12 --n 20 --out eval/reports/rome_layer_sweep_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import shift_edit
from shift_edit.io import atomic_write_json, provenance
from shift_edit.requests import make_request
from shift_edit.scoring import score_continuations
from shift_edit.stats import layer_stats, shared_data_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparams", required=True)
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="sweep these layers (ROME: one at a time)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = shift_edit.load_model(args.model)
    base = shift_edit.load_hparams(args.hparams)
    records = json.load(open(shared_data_dir() / "counterfact-original-format-subset837.json"))
    records = records[args.start : args.start + args.n]
    settings = [[layer] for layer in args.layers] if args.layers else [base.layers]
    results = {"protocol": {
        "metric_family": "strict top-1 (every target_new token is the argmax under teacher forcing), rewrite prompt only",
        "records": f"counterfact-original-format-subset837.json[{args.start}:{args.start + args.n}]",
        "edit": "one record at a time on the unedited model, undone after scoring; skip_if_predicted off",
        "hparams": base.to_dict(), "provenance": provenance(model)}, "runs": []}
    for layers in settings:
        hp = base.replace(layers=layers, skip_if_predicted=False)
        layer_stats(model, tok, layers, corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens,
                               max_length=hp.mom2_max_length, dtype=hp.mom2_dtype)  # one-off, not timed
        ok, times, rows = 0, [], []
        for rec in records:
            req = make_request(rec)
            t0 = time.perf_counter()
            res = shift_edit.edit(model, tok, req, hp)
            times.append(time.perf_counter() - t0)
            s = score_continuations(model, tok, [req.text], [req.target_new])[0]
            res.undo()
            ok += s.all_correct
            rows.append({"case_id": req.case_id, "correct": s.all_correct, "time_s": times[-1]})
            print(f"layers={layers} case={req.case_id} ok={s.all_correct} t={times[-1]:.1f}s", flush=True)
        run = {"layers": layers, "n": len(records), "efficacy_top1": ok / len(records),
               "median_edit_s": statistics.median(times), "rows": rows}
        results["runs"].append(run)
        print(f"layers={layers}: efficacy {ok}/{len(records)} median {run['median_edit_s']:.1f}s", flush=True)
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
