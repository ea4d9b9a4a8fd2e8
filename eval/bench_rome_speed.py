"""Per-edit time: SHIFT vs ROME on the same records, measured in one run.

Statistics (ROME's C) are computed or loaded before timing and excluded; ROME's context
templates are generated once per model (a one-off like the statistics) by an untimed
warm-up edit. Each timed edit is one record on the unedited model via ``shift_edit.edit``
(skip check off), then undone. Prints the median per-edit times and their ratio.

    SHIFT_EDIT_DATA=/work/shared/data python eval/bench_rome_speed.py \
        --shift-hparams hparams/SHIFT/smollm2-135m.yaml --rome-hparams hparams/ROME/smollm2-135m.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import shift_edit
from shift_edit.core.requests import make_request
from shift_edit.files.data_files import require_data
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.model.covariance import layer_stats


def _time_edits(model, tok, reqs, hp) -> list[float]:
    out = []
    for req in reqs:
        t0 = time.perf_counter()
        res = shift_edit.edit(model, tok, req, hp)
        out.append(time.perf_counter() - t0)
        res.undo()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shift-hparams", required=True)
    ap.add_argument("--rome-hparams", required=True)
    ap.add_argument("--n-shift", type=int, default=20)
    ap.add_argument("--n-rome", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-stats", action="store_true",
                    help="recompute ROME's statistics (rebuild the cache entry) to time the one-off cost")
    ap.add_argument("--out", default="eval/reports/rome_memit/bench_rome_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = shift_edit.load_model(args.model)
    shift_hp = shift_edit.load_hparams(args.shift_hparams).replace(skip_if_predicted=False)
    rome_hp = shift_edit.load_hparams(args.rome_hparams).replace(skip_if_predicted=False)
    records = json.load(open(require_data("counterfact-subset")))
    reqs = [make_request(r) for r in records[: max(args.n_shift, args.n_rome) + 1]]

    t0 = time.perf_counter()
    layer_stats(model, tok, rome_hp.layers, corpus=rome_hp.mom2_corpus, n_tokens=rome_hp.mom2_n_tokens,
                max_length=rome_hp.mom2_max_length, dtype=rome_hp.mom2_dtype, rebuild=args.time_stats)
    stats_s = time.perf_counter() - t0  # without --time-stats: loading the cached entry
    t0 = time.perf_counter()
    shift_edit.edit(model, tok, reqs[-1], rome_hp).undo()  # warm-up: generates the context templates
    warmup_s = time.perf_counter() - t0
    _time_edits(model, tok, reqs[-1:], shift_hp)  # warm-up
    shift_t = _time_edits(model, tok, reqs[: args.n_shift], shift_hp)
    rome_t = _time_edits(model, tok, reqs[: args.n_rome], rome_hp)
    ms, mr = statistics.median(shift_t), statistics.median(rome_t)
    result = {
        "protocol": {
            "what": "median wall time of shift_edit.edit per single-record edit on the unedited model, CPU, "
                    f"torch threads={args.threads}; ROME statistics and context generation excluded (one-off)",
            "records": "counterfact-original-format-subset837.json, first records",
            "shift_hparams": shift_hp.to_dict(), "rome_hparams": rome_hp.to_dict(),
            "provenance": provenance(model),
        },
        "shift_s": shift_t, "rome_s": rome_t, "shift_median_s": ms, "rome_median_s": mr,
        "ratio_rome_over_shift": mr / ms, "one_off_stats_s": stats_s, "stats_recomputed": args.time_stats,
        "one_off_rome_warmup_edit_s": warmup_s,
    }
    atomic_write_json(args.out, result)
    print(f"SHIFT median {ms * 1000:.1f} ms/edit (n={len(shift_t)}); ROME median {mr:.2f} s/edit (n={len(rome_t)})")
    print(f"ratio ROME/SHIFT = {mr / ms:.0f}x  (statistics {stats_s:.1f} s and warm-up {warmup_s:.1f} s excluded)")


if __name__ == "__main__":
    main()
