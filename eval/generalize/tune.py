"""Tuning loop for SHIFT_SUBJECT (or any algorithm): edit, score in the ROME family and strict top-1, undo.

The tuning records are outside every reported set: of ``counterfact-original-format-union1820.json``, those after
the first 1000 (the lifelong run's records) that are not among the first 300 of
``counterfact-original-format-subset837.json`` (the single-edit table's records); of those, the last 200, and the
first ``--n`` of them are used. Prints one JSON line: the overrides, the means (x100) and the median CPU seconds per
edit (``time.process_time``, so a shared machine changes it less than wall time).

Usage::

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. python eval/generalize/tune.py --n 40 \\
        --hparams hparams/SHIFT_SUBJECT/smollm2-135m.yaml v_num_grad_steps=8 v_lr=2.0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.bench.metrics import metrics_from_scores, score_case
from shift_edit.core.registry import load_hparams


def tuning_case_ids(data: Path) -> list[int]:
    """The 200 tuning records' case ids, in file order."""
    union = json.loads((data / "counterfact-original-format-union1820.json").read_text())
    subset = json.loads((data / "counterfact-original-format-subset837.json").read_text())
    first300 = {r["case_id"] for r in subset[:300]}
    return [r["case_id"] for r in union[1000:] if r["case_id"] not in first300][-200:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--hparams", required=True)
    ap.add_argument("overrides", nargs="*", help="field=JSON value")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    data = Path(os.environ.get("SHIFT_EDIT_DATA", "../shared/data"))
    over = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.overrides)}
    model, tok = se.load_model("smollm2-135m")
    hp = load_hparams(args.hparams).replace(**over)
    ids = tuning_case_ids(data)[: args.n]
    cases = {str(c.case_id): c for c in load_counterfact(data / "counterfact-original-format-union1820.json")}
    sums: dict[str, list[float]] = {}
    cpu: list[float] = []
    for cid in ids:
        case = cases[str(cid)]
        t0 = time.process_time()
        res = se.edit(model, tok, case.request, hp)
        cpu.append(time.process_time() - t0)
        m = metrics_from_scores(score_case(model, tok, case))
        res.undo()
        for fam in ("rome", "top1"):
            for k, v in m[fam].items():
                sums.setdefault(f"{fam}.{k}", []).append(v)
    out = {k: round(100 * sum(v) / len(v), 1) for k, v in sums.items()}
    out["cpu_s_median"] = round(sorted(cpu)[len(cpu) // 2], 2)
    print(json.dumps({"overrides": over, "n": len(ids), **out}))


if __name__ == "__main__":
    main()
