"""How much each of issue 36's options changes ROME's and MEMIT's weight update, one option at a time.

For each CounterFact record, ΔW (all edited matrices, stacked) is computed with the shipped SmolLM2 hparams (the
reference semantics) and with one earlier variant switched on (``context_length_mode: new``, ``v_step_count: n``,
MEMIT's ``key_average: flat``) or all of them; printed and written: per variant the median (min-max) cosine between
its ΔW and the reference ΔW and the median ratio of their norms. No scoring (the bench runs measure the outcome);
the z* cache is off; ``skip_if_predicted`` is off so every record is edited.

Usage::

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. OMP_NUM_THREADS=1 python eval/refsem_options.py --n 5 \\
        --out eval/reports/rome_memit/refsem/options.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import shift_edit as se
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.core.registry import get_algorithm, load_hparams
from shift_edit.files.data_files import find_data
from shift_edit.files.io import atomic_write_json

VARIANTS = {
    "ROME": {"new lengths": {"context_length_mode": "new"}, "n steps": {"v_step_count": "n"},
             "all earlier": {"context_length_mode": "new", "v_step_count": "n"}},
    "MEMIT": {"new lengths": {"context_length_mode": "new"}, "n steps": {"v_step_count": "n"},
              "flat keys": {"key_average": "flat"},
              "all earlier": {"context_length_mode": "new", "v_step_count": "n", "key_average": "flat"}},
}


def delta_vector(model, tok, request, hp) -> torch.Tensor:
    """ΔW of one request under ``hp``, all edited matrices flattened into one float64 vector (layer order)."""
    computed = get_algorithm(hp.ALG_NAME).compute(model, tok, [request], hp)
    return torch.cat([d.canonical().double().flatten() for d in sorted(computed.deltas, key=lambda d: d.layer)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=5, help="records (the first n of the data file)")
    p.add_argument("--data", default=None, help="CounterFact JSON (default: the shared subset837 file)")
    p.add_argument("--algs", default="ROME,MEMIT")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model, tok = se.load_model("smollm2-135m")
    data = args.data or str(find_data("counterfact-subset"))
    cases = load_counterfact(data)[: args.n]
    out: dict = {"records": [c.case_id for c in cases], "data": data, "algorithms": {}}
    for alg in args.algs.split(","):
        base = load_hparams(f"hparams/{alg}/smollm2-135m.yaml").replace(skip_if_predicted=False, max_relative_norm=None)
        if hasattr(base, "zstar_cache"):
            base = base.replace(zstar_cache=False)
        rows: dict[str, dict[str, list[float]]] = {name: {"cosine": [], "norm_ratio": []} for name in VARIANTS[alg]}
        ref_norms = []
        t0 = time.perf_counter()
        for case in cases:
            ref = delta_vector(model, tok, case.request, base)
            ref_norms.append(float(ref.norm()))
            for name, change in VARIANTS[alg].items():
                other = delta_vector(model, tok, case.request, base.replace(**change))
                rows[name]["cosine"].append(float(other @ ref / (other.norm() * ref.norm())))
                rows[name]["norm_ratio"].append(float(other.norm() / ref.norm()))
        summary = {name: {"cosine_median": statistics.median(r["cosine"]), "cosine_min": min(r["cosine"]),
                          "cosine_max": max(r["cosine"]), "norm_ratio_median": statistics.median(r["norm_ratio"]),
                          "per_record": r} for name, r in rows.items()}
        out["algorithms"][alg] = {"variants": summary, "reference_dW_norms": ref_norms,
                                  "seconds": time.perf_counter() - t0}
        for name, s in summary.items():
            print(f"{alg:6s} {name:12s} cosine median {s['cosine_median']:.4f} ({s['cosine_min']:.4f}-"
                  f"{s['cosine_max']:.4f}), norm ratio median {s['norm_ratio_median']:.4f}")
    if args.out:
        atomic_write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
