"""Combine a SHIFT_SUBJECT run without ``v_retry_steps`` and a run with it over the records whose top-1 check failed.

``v_retry_steps`` only acts on a request whose prompt is not strict top-1 with the neuron in place (``info.top1``
false): every other request is computed exactly as without it (the fit loop stops after the first fit when the
check passes). So the 300-record numbers of the hparams with the option are those of the first run, with the failed
records' case files replaced by the second run's. Both runs score every record alike (one edit at a time, undone before
the next); the second run has no
n-gram generation and no perplexity (none of the replaced records is at a perplexity position), so those two
columns keep the first run's values. Prints the per-family means (x100) of both and the records replaced.

Usage::

    python eval/generalize/merge_retry.py RUN_WITHOUT RUN_WITH_ON_FAILED [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

KEYS = {"efficacy_top1": ("top1", "rewrite_acc"), "paraphrase_top1": ("top1", "paraphrase_acc"),
        "neighborhood_top1": ("top1", "neighborhood_acc"), "ES": ("rome", "rewrite_success"),
        "PS": ("rome", "paraphrase_success"), "NS": ("rome", "neighborhood_success"),
        "gen_efficacy": ("wild", "rewrite_success"), "gen_paraphrase": ("wild", "paraphrase_success")}


def _cases(run: Path) -> dict[str, dict]:
    return {str(c["case_id"]): c for c in (json.loads(p.read_text()) for p in run.glob("case_*.json"))}


def _info(case: dict) -> dict:
    info = case["edit"]["info"]
    return info[0] if isinstance(info, list) else info


def means(cases: dict[str, dict]) -> dict[str, float]:
    out = {}
    for name, (fam, key) in KEYS.items():
        vals = [c["metrics"][fam][key] for c in cases.values() if key in c["metrics"].get(fam, {})]
        out[name] = round(100 * sum(vals) / len(vals), 2)
    es, ps, ns = out["ES"], out["PS"], out["NS"]
    out["S"] = round(3 / (1 / es + 1 / ps + 1 / ns), 2) if min(es, ps, ns) > 0 else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("without", type=Path)
    ap.add_argument("retried", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    first, second = _cases(args.without), _cases(args.retried)
    failed = sorted(k for k, c in first.items() if c["edit"].get("applied") and not _info(c).get("top1", True))
    missing = [k for k in failed if k not in second]
    if missing:
        raise SystemExit(f"the second run lacks the failed records {missing}")
    merged = {**first, **{k: second[k] for k in failed}}
    result = {"n": len(merged), "replaced": failed,
              "fixed": [k for k in failed if _info(second[k]).get("top1")],
              "without_retry": means(first), "with_retry": means(merged),
              "how": __doc__.split("\n\n")[1].replace("\n", " ")}
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    assert all(math.isfinite(v) for v in result["with_retry"].values())


if __name__ == "__main__":
    main()
