"""How much generic text must a rank-one FF2 edit disturb? A lower bound per layer, and the real edits.

For an edit that adds ``Δ = v uᵀ`` to FF2 at layer ``L`` and must write the push ``s v`` (``‖v‖ = 1``)
at the edit key ``k`` (``uᵀk = 1``), the expected squared change of FF2's output over generic text is

    E‖Δ x‖² = uᵀ C u  >=  1 / (kᵀ C⁻¹ k)   (Cauchy-Schwarz in the C metric; equality at u ∝ C⁻¹k),

times ``s²``, where ``C = E[x xᵀ]`` are the cached statistics. So no choice of key direction (whitening,
contrast, null space) can bring one edit's disturbance below ``s² / (kᵀC⁻¹k)``: a layer is cheap to edit
only if its edit key is *unusual* for generic text (large ``kᵀC⁻¹k``) and a small push suffices.

Measured here, per layer, on the first ``--n`` records of the 837-record CounterFact file:

- ``maha``: ``kᵀC⁻¹k`` of the last prompt token's FF2 input (``d_ff`` = 1536 is the mean over generic
  tokens), and of the subject's last token (ROME's key);
- ``push``: the smallest norm of a push along ``D[t]`` (the target's decoding row) added to block ``L``'s
  output at the last token that gives the first target token a logit margin of 2 (geometric grid, ratio √2);
- ``bound``: ``push² / maha`` relative to ``E‖FF2 output‖² = tr(W C Wᵀ)`` (the "energy" of the layer's output);
- the real edits: ``tr(Δ C Δᵀ) / tr(W C Wᵀ)`` of SHIFT, SHIFT_PLUS and ROME deltas on the same records.

    SHIFT_EDIT_DATA=../shared/data python eval/shift_plus/disturbance.py --n 20 \\
        --out eval/reports/shift_plus/disturbance.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.core.requests import encode_prompt, encode_target, make_request
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.covariance import layer_stats
from shift_edit.model.hooks import capture_inputs
from shift_edit.studies.counterfact_records import load_records

sys.path.insert(0, str(Path(__file__).resolve().parent))
from value_probes import norm_needed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GRID = [10 * math.sqrt(2) ** i for i in range(17)]  # 10 .. 2560


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="records (first n of the 837-record file)")
    ap.add_argument("--layers", default="5,11,17,20,23,26,29")
    ap.add_argument("--edits",
                    default="SHIFT,SHIFT_PLUS,ROME=eval/reports/sequential/hparams/ROME-smollm2-135m-stats50k.yaml",
                    help="real edits whose disturbance is measured (ALG or ALG=hparams file)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = se.load_model("smollm2-135m")
    adapter = ModelAdapter(model)
    stats = layer_stats(model, tok, layers, n_tokens=50_000, max_length=128, progress=False)
    c = {L: stats[L].mom2.double() for L in layers}
    c_inv = {
        L: torch.linalg.inv(
            c[L] + 1e-6 * float(torch.diagonal(c[L]).mean()) * torch.eye(c[L].shape[0], dtype=torch.float64)
        )
        for L in layers
    }
    energy = {}
    for L in layers:
        ff2 = adapter.module(adapter.ff2_name(L))
        wt = ff2.weight.detach().double()
        wt = wt if wt.shape[1] == c[L].shape[0] else wt.T  # [out, in]
        energy[L] = float(torch.trace(wt @ c[L] @ wt.T))
    dmat = adapter.decoding_matrix().detach().double()
    records = load_records(n=args.n)
    per_layer = {L: {"maha_last": [], "maha_subject": [], "push": []} for L in layers}
    with torch.no_grad():
        for rec in records:
            req = make_request(rec)
            ids = encode_prompt(tok, req.text)
            t = encode_target(tok, req.text, req.target_new)[0]
            end = req.text.index(req.subject) + len(req.subject)
            subj = len(encode_prompt(tok, req.text[:end])) - 1
            names = [adapter.ff2_name(L) for L in layers]
            with capture_inputs(model, names) as cap:
                model(input_ids=torch.tensor([ids]))
            direction = (dmat[t] / dmat[t].norm()).float()
            for L, name in zip(layers, names):
                x = cap.inputs[name][0].double()
                per_layer[L]["maha_last"].append(float(x[-1] @ c_inv[L] @ x[-1]))
                per_layer[L]["maha_subject"].append(float(x[subj] @ c_inv[L] @ x[subj]))
                per_layer[L]["push"].append(norm_needed(model, adapter, ids, L, -1, direction, t, GRID))
    rows = []
    for L in layers:
        d = per_layer[L]
        bound = [p * p / m / energy[L] for p, m in zip(d["push"], d["maha_last"]) if math.isfinite(p)]
        rows.append({"layer": L, "maha_last_median": statistics.median(d["maha_last"]),
                     "maha_subject_median": statistics.median(d["maha_subject"]),
                     "push_median": statistics.median(d["push"]),
                     "push_reached": sum(math.isfinite(p) for p in d["push"]) / len(d["push"]),
                     "ffn_output_energy": energy[L],
                     "bound_relative_median": statistics.median(bound) if bound else None,
                     "bound_absolute_median": statistics.median(b * energy[L] for b in bound) if bound else None,
                     "per_record": d})
        print(f"layer {L:2d}: k'C^-1k last {rows[-1]['maha_last_median']:8.0f}  subject "
              f"{rows[-1]['maha_subject_median']:8.0f}"
              f"  push (margin 2) {rows[-1]['push_median']:7.1f} (reached {100 * rows[-1]['push_reached']:.0f}%)"
              f"  tr(WCW') {energy[L]:8.1f}  bound s^2/(k'C^-1k)/tr(WCW') {rows[-1]['bound_relative_median']}",
              flush=True)
    edits = {}
    for spec in args.edits.split(","):
        alg, eq, file = spec.partition("=")
        hp = se.load_hparams(REPO / file if eq else REPO / "hparams" / alg / "smollm2-135m.yaml").replace(
            skip_if_predicted=False
        )
        vals, absolute = [], []
        for rec in records:
            res = se.edit(model, tok, rec, hp)
            for dlt in res.deltas:
                L = dlt.layer
                if L not in c:
                    raise SystemExit(f"{alg} edits layer {L}: add it to --layers")
                delta = dlt.canonical(torch.float64)
                absolute.append(float(torch.trace(delta @ c[L] @ delta.T)))
                vals.append(absolute[-1] / energy[L])
            res.undo()
        edits[alg] = {"hparams": hp.to_dict(), "relative_disturbance": vals, "disturbance": absolute,
                      "relative_disturbance_median": statistics.median(vals)}
        print(f"{alg}: tr(dW C dW') / tr(W C W') median {statistics.median(vals):.4g} over {len(vals)} edits",
              flush=True)
    atomic_write_json(Path(args.out), {
        "what": __doc__, "records": f"first {len(records)} of the 837-record CounterFact file",
        "statistics": "50,000 WikiText-2 test tokens, lines cut at 128 tokens", "layers": rows, "edits": edits,
        "provenance": provenance(model)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
