"""Relative norms ||ΔW||_F / ||W||_F that the shipped SmolLM2 hparams of every algorithm produce.

Protocol: SmolLM2-135M-Instruct, the shipped ``hparams/<ALG>/smollm2-135m.yaml`` with
``skip_if_predicted`` off (so every record is edited), CounterFact records ``--first`` ..
(ROME format subset837), one edit at a time (undone before the next); plus SHIFT applied
sequentially (each edit relative to the weight as edited so far) and MEMIT batches of
``--batch`` records. Prints one JSON line per measurement and a summary; the edit guard is off
(``force``) so the raw numbers are measured.

    PYTHONPATH=. python eval/robustness/relative_norms.py --records 5 --batch 10 > eval/robustness/relative_norms.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.compat.easyedit_editor import load_hparams

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "counterfact-original-format-subset837.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=5)
    ap.add_argument("--first", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--algs", default="SHIFT,SGD,ADAM,FT,FT_L,ROME,MEMIT")
    ap.add_argument("--sequential", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    recs = json.loads(DATA.read_text())
    model, tok = se.load_model("smollm2-135m")
    out: dict[str, list[float]] = {}

    def emit(kind: str, alg: str, res) -> None:
        for row in res.summary():
            line = {"kind": kind, "alg": alg, "module": row["module"], "relative_norm": row["relative_norm"]}
            out.setdefault(f"{alg} {kind}", []).append(row["relative_norm"])
            print(json.dumps(line), flush=True)

    for alg in a.algs.split(","):
        hp = load_hparams(REPO / "hparams" / alg / "smollm2-135m.yaml").replace(skip_if_predicted=False)
        kw = {"force": True} if "force" in se.edit.__code__.co_varnames else {}
        for rec in recs[a.first : a.first + a.records]:
            res = se.edit(model, tok, rec, hp, **kw)
            emit("single", alg, res)
            res.undo()
        if alg == "SHIFT":
            done = []
            for rec in recs[a.first : a.first + a.sequential]:
                res = se.edit(model, tok, rec, hp, **kw)
                emit(f"sequential{a.sequential}", alg, res)
                done.append(res)
            for res in reversed(done):
                res.undo()
        if alg == "MEMIT" and a.batch > 1:
            res = se.edit(model, tok, recs[a.first : a.first + a.batch], hp, **kw)
            emit(f"batch{a.batch}", alg, res)
            res.undo()
    for key, vals in out.items():
        print(f"# {key}: n={len(vals)} max={max(vals):.4g} median={sorted(vals)[len(vals)//2]:.4g}", file=sys.stderr,
              flush=True)


if __name__ == "__main__":
    main()
