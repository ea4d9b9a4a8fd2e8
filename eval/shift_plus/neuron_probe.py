"""Would a gated neuron per fact escape the disturbance bound? A measurement, no edit.

The bound of ``disturbance.py`` holds for any change of FF2 alone, because FF2 is linear in its input. A
neuron whose FF1 rows (gate and up, SmolLM2's gated MLP) are rewritten to fire on the edit prompt is not:
with ``z(h) = wᵀh`` on FF1's input ``h`` (the post-attention-norm residual) and both rows along ``w``, its
activation ``SiLU(α z) · z`` is ~0 for ``z < 0`` and grows as ``z²`` above, so generic text costs
``E[a(h)²] / a(h_e)²`` per unit push instead of the linear ``1 / (kᵀC⁻¹k)``. The key ``w`` is the prototype's
(``neuron_prototype.neuron_key``: ``wᵀμ = 0``, so no bias is needed).

Measured at one layer on the first ``--n`` records of the 837-record file, against ``--tokens`` WikiText-2
tokens (mean ``μ`` and covariance ``Σ`` of ``h``): least ``wᵀ(Σ + w_c Σ_c h̃_c h̃_cᵀ)w`` with ``wᵀ(h_e - μ) = 1`` and
``wᵀμ = 0``, the template filled with the 16 contrastive subjects (``h̃_c = h_c - μ``, weight ``w_c`` =
``--contrast-weight``
relative to the per-token moment, as SHIFT_PLUS weighs its contrastive keys), ``α`` such that ``α z_e = 10``.
Beside each number, the same for SHIFT_PLUS's linear key on FF2's input (``u ∝ A⁻¹k``, ``A = C + w_c Σ k_c k_cᵀ``,
``uᵀk_e = 1``): its generic cost ``uᵀCu`` and the share ``uᵀk`` a paraphrase / neighbour receives. Reported per record
(medians):

- ``generic``: ``E[a(h)²] / a_e²`` over the WikiText tokens (those tokens are also the ones ``μ, Σ`` came
  from: an optimistic estimate), beside the linear bound ``1 / kᵀC⁻¹k`` from the cached FF2 statistics;
- ``paraphrase`` / ``neighborhood``: ``a(h) / a_e`` at those prompts' last token (how much of the push each
  would receive: paraphrases should get ~1, neighbours ~0);
- the cheapest neuron to give up: ``min_j E[x_j²] ‖W_down[:, j]‖²`` over ``tr(W C Wᵀ)``.

    SHIFT_EDIT_DATA=../shared/data python eval/shift_plus/neuron_probe.py --n 20 \\
        --out eval/reports/shift_plus/neuron_probe.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.algorithms.shift.push import CONTRAST_SUBJECTS
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.bench.wikitext import read_wikitext_lines
from shift_edit.core.requests import encode_prompt
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.covariance import layer_stats
from shift_edit.model.hooks import capture_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neuron_prototype import generic_inputs, neuron_key  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def last_inputs(model, tok, name: str, texts: list[str]) -> torch.Tensor:
    """``name``'s input at the last token of each text ``[n, d]`` (float64)."""
    out = []
    for t in texts:
        with capture_inputs(model, [name]) as cap:
            model(input_ids=torch.tensor([encode_prompt(tok, t)]))
        out.append(cap.inputs[name][0, -1].double())
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layer", type=int, default=23)
    ap.add_argument("--tokens", type=int, default=6000, help="WikiText tokens for μ, Σ and the generic cost")
    ap.add_argument("--contrast-weight", type=float, default=1000.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = se.load_model("smollm2-135m")
    adapter = ModelAdapter(model)
    L = args.layer
    ff1 = adapter.ff1_names(L)[0]  # gate_proj: its input is h
    ff2 = adapter.ff2_name(L)
    # generic h: WikiText lines, 128 tokens each
    lines = read_wikitext_lines(str(DATA / "wikitext-2-raw-v1" / "wiki.test.nonblank.raw"))
    with torch.no_grad():
        hg = generic_inputs(model, tok, ff1, lines, args.tokens)
    mu = hg.mean(0)
    sigma = torch.cov((hg - mu).T) + 1e-4 * torch.eye(hg.shape[1], dtype=torch.float64)
    c = layer_stats(model, tok, [L], n_tokens=50_000, max_length=128, progress=False)[L].mom2.double()
    c_inv = torch.linalg.inv(c + 1e-6 * float(torch.diagonal(c).mean()) * torch.eye(c.shape[0], dtype=torch.float64))
    w_down = adapter.module(ff2).weight.detach().double()  # [out, in]
    energy = float(torch.trace(w_down @ c @ w_down.T))
    neuron_cost = torch.diagonal(c) * (w_down ** 2).sum(0) / energy
    rows = []
    with torch.no_grad():
        for case in load_counterfact(DATA / "counterfact-original-format-subset837.json", limit=args.n):
            req = case.request
            template = req.prompt
            contrast = [template.format(s) for s in CONTRAST_SUBJECTS if s != req.subject][:16]
            h_e = last_inputs(model, tok, ff1, [req.text])[0]
            h_c = last_inputs(model, tok, ff1, contrast) - mu
            k_e = last_inputs(model, tok, ff2, [req.text])[0]
            k_c = last_inputs(model, tok, ff2, contrast)
            u = torch.linalg.solve(c + args.contrast_weight * (k_c.T @ k_c), k_e)
            u = u / float(u @ k_e)
            w = neuron_key(h_e, h_c + mu, mu, sigma, args.contrast_weight)  # wᵀh_e = 1, wᵀμ = 0
            alpha = 10.0

            def act(h: torch.Tensor) -> torch.Tensor:
                z = h @ w
                return torch.nn.functional.silu(alpha * z) * z

            a_e = float(act(h_e[None])[0])
            para = last_inputs(model, tok, ff1, list(case.paraphrase_prompts))
            nbr = last_inputs(model, tok, ff1, list(case.neighborhood_prompts))
            k_para = last_inputs(model, tok, ff2, list(case.paraphrase_prompts))
            k_nbr = last_inputs(model, tok, ff2, list(case.neighborhood_prompts))
            rows.append({
                "case_id": case.case_id,
                "generic": float((act(hg) ** 2).mean()) / a_e ** 2,
                "generic_max": float(act(hg).abs().max()) / a_e,
                "linear_bound": 1.0 / float(k_e @ c_inv @ k_e),
                "linear_cost": float(u @ c @ u),
                "paraphrase": [float(x) / a_e for x in act(para)],
                "neighborhood": [float(x) / a_e for x in act(nbr)],
                "linear_paraphrase": [float(x) for x in k_para @ u],
                "linear_neighborhood": [float(x) for x in k_nbr @ u],
                "contrast_max": float(act(h_c + mu).max()) / a_e,
            })
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    summary = {
        "layer": L,
        "records": len(rows),
        "generic_tokens": len(hg),
        "generic_cost_median": med([r["generic"] for r in rows]),
        "linear_bound_median": med([r["linear_bound"] for r in rows]),
        "linear_cost_median": med([r["linear_cost"] for r in rows]),
        "ratio_linear_cost_over_neuron_median": med([r["linear_cost"] / r["generic"] for r in rows]),
        "generic_max_median": med([r["generic_max"] for r in rows]),
        "paraphrase_share_median": med([x for r in rows for x in r["paraphrase"]]),
        "paraphrase_share_over_half": 100
        * sum(x > 0.5 for r in rows for x in r["paraphrase"])
        / max(1, sum(len(r["paraphrase"]) for r in rows)),
        "neighborhood_share_median": med([x for r in rows for x in r["neighborhood"]]),
        "neighborhood_share_over_half": 100
        * sum(x > 0.5 for r in rows for x in r["neighborhood"])
        / max(1, sum(len(r["neighborhood"]) for r in rows)),
        "linear_paraphrase_share_median": med([x for r in rows for x in r["linear_paraphrase"]]),
        "linear_paraphrase_share_over_half": 100
        * sum(x > 0.5 for r in rows for x in r["linear_paraphrase"])
        / max(1, sum(len(r["linear_paraphrase"]) for r in rows)),
        "linear_neighborhood_share_median": med([x for r in rows for x in r["linear_neighborhood"]]),
        "linear_neighborhood_share_over_half": 100
        * sum(x > 0.5 for r in rows for x in r["linear_neighborhood"])
        / max(1, sum(len(r["linear_neighborhood"]) for r in rows)),
        "cheapest_neuron_cost": float(neuron_cost.min()),
        "neuron_cost_1000th": float(neuron_cost.sort().values[min(999, len(neuron_cost) - 1)]),
    }
    for k, v in summary.items():
        print(f"{k}: {v}", flush=True)
    atomic_write_json(Path(args.out), {"what": __doc__, "summary": summary, "per_record": rows,
                                       "provenance": provenance(model)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
