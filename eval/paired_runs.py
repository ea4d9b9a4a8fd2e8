"""Two ``shift-edit bench`` run folders compared record by record, on the records both hold.

For each metric (strict top-1 efficacy / paraphrase / neighborhood, ROME's ES / PS / NS, neighborhood KL) the mean
of each run (x100 except KL), their difference with a paired 95% half-width (normal approximation over the
per-record differences), and how many records changed; for the edit, the mean ‖ΔW‖ (Frobenius, summed over the
edited matrices of a record, 0 for a skipped record) and the mean of the per-record ratio, the mean optimiser steps
and the records whose edit was skipped (already predicted) or refused. Written for issue 36 (reference semantics
of ROME/MEMIT vs the earlier variants), usable for any two runs of the same records.

Usage::

    PYTHONPATH=. python eval/paired_runs.py RUN_A RUN_B --labels reference earlier --out paired.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from shift_edit.files.io import atomic_write_json

#: (name, how to read it from a case file's metrics), x100 unless named in UNSCALED
METRICS = {
    "efficacy_top1": lambda m: m["top1"]["rewrite_acc"],
    "paraphrase_top1": lambda m: m["top1"]["paraphrase_acc"],
    "neighborhood_top1": lambda m: m["top1"]["neighborhood_acc"],
    "ES": lambda m: m["rome"]["rewrite_success"],
    "PS": lambda m: m["rome"]["paraphrase_success"],
    "NS": lambda m: m["rome"]["neighborhood_success"],
    "neighborhood_kl": lambda m: m["neighborhood_kl"]["mean"],
}
UNSCALED = {"neighborhood_kl"}


def read_cases(run: Path) -> dict[int, dict]:
    """case id -> case record of a run folder (``case_<id>.json``)."""
    out = {}
    for f in run.glob("case_*.json"):
        d = json.loads(f.read_text())
        out[int(d["case_id"])] = d
    return out


def dw_norm(case: dict) -> float:
    """‖ΔW‖ of a record's edit: the Frobenius norm over all its edited matrices (0 when nothing was applied)."""
    edit = case["edit"]
    if not edit.get("applied"):
        return 0.0
    return math.sqrt(sum(d["delta_norm"] ** 2 for d in edit.get("deltas", [])))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _half_width(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    mu = _mean(xs)
    return 1.96 * math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def compare(a: dict[int, dict], b: dict[int, dict], labels: tuple[str, str]) -> dict:
    """The paired comparison of two runs' case records on their common case ids."""
    ids = sorted(set(a) & set(b))
    la, lb = labels
    out: dict = {"n_records": len(ids), "case_ids": ids, "labels": list(labels), "metrics": {}}
    for name, get in METRICS.items():
        scale = 1.0 if name in UNSCALED else 100.0
        va = [scale * get(a[i]["metrics"]) for i in ids]
        vb = [scale * get(b[i]["metrics"]) for i in ids]
        diff = [x - y for x, y in zip(va, vb)]
        out["metrics"][name] = {la: _mean(va), lb: _mean(vb), "difference": _mean(diff),
                                "difference_ci95": _half_width(diff),
                                "records_changed": sum(1 for d in diff if abs(d) > 1e-12)}
    na, nb = [dw_norm(a[i]) for i in ids], [dw_norm(b[i]) for i in ids]
    both = [(x, y) for x, y in zip(na, nb) if x > 0 and y > 0]
    out["edit"] = {
        f"mean_dW_norm_{la}": _mean(na), f"mean_dW_norm_{lb}": _mean(nb),
        "mean_dW_norm_ratio": _mean([x / y for x, y in both]), "records_edited_by_both": len(both),
        f"mean_steps_{la}": _mean([a[i]["edit"].get("info", {}).get("steps", 0) for i in ids]),
        f"mean_steps_{lb}": _mean([b[i]["edit"].get("info", {}).get("steps", 0) for i in ids]),
        f"skipped_{la}": sum(bool(a[i]["edit"].get("skipped")) for i in ids),
        f"skipped_{lb}": sum(bool(b[i]["edit"].get("skipped")) for i in ids),
        f"refused_{la}": sum("refused" in a[i]["edit"] for i in ids),
        f"refused_{lb}": sum("refused" in b[i]["edit"] for i in ids),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--labels", nargs=2, default=["a", "b"])
    p.add_argument("--out", type=Path, help="write the comparison here as JSON (else print it)")
    args = p.parse_args(argv)
    a, b = read_cases(args.run_a), read_cases(args.run_b)
    if not set(a) & set(b):
        print(f"no common records in {args.run_a} and {args.run_b}", file=sys.stderr)
        return 2
    res = compare(a, b, tuple(args.labels))
    res["runs"] = {args.labels[0]: str(args.run_a), args.labels[1]: str(args.run_b)}
    if args.out:
        atomic_write_json(args.out, res)
    else:
        print(json.dumps({k: v for k, v in res.items() if k != "case_ids"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
