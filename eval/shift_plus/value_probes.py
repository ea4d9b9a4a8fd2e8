"""Forward-only values that SHIFT_PLUS could write, probed by patching the residual stream (no edit).

Each probe adds a vector to block ``L``'s output at one position of the bare prompt and asks whether the
model then predicts the new target (first token, logit margin over the runner-up):

- ``subject_decoding``: ``s · D̂[t]`` (the target's unit decoding row) at the subject's last token, for the
  smallest grid norm ``s`` (10 .. 5120, ratio √2) that gives margin >= 2 — ROME's position with SHIFT's value;
- ``subject_icl``: the in-context delta at the subject's last token: the residual at the subject's second
  mention in ``"<prompt><target>.\\n<prompt>"`` minus the bare prompt's, scaled by 1, 2, 4, 8 (margin > 0);
- ``last_icl`` vs ``last_decoding``: at the last token, the in-context delta (scale 1) against ``D̂[t]`` with
  the same norm (margin > 0), and the norm each direction needs for margin >= 2.

    SHIFT_EDIT_DATA=../shared/data python eval/shift_plus/value_probes.py --n 20 \\
        --out eval/reports/shift_plus/value_probes.json
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
from shift_edit.model.hooks import owned_hooks
from shift_edit.studies.counterfact_records import load_records

GRID = [10 * math.sqrt(2) ** i for i in range(19)]  # 10 .. 5120


def margin(logits: torch.Tensor, t: int) -> float:
    other = logits.clone()
    other[t] = float("-inf")
    return float(logits[t] - other.max())


def run(model, adapter, ids: list[int], layer: int | None = None, pos: int = -1,
        add: torch.Tensor | None = None, keep: list | None = None) -> torch.Tensor:
    """Last-token logits; optionally ``add`` to block ``layer``'s output at ``pos`` and/or keep that output."""
    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        if keep is not None:
            keep.append(h[0].detach().clone())
        if add is None:
            return None
        h = h.clone()
        h[0, pos] += add
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with owned_hooks() as hooks:
        if layer is not None:
            hooks.forward_hook(adapter.blocks()[layer], hook)
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def norm_needed(model, adapter, ids, layer, pos, direction, t, grid: list[float] = GRID) -> float:
    """Smallest ``grid`` norm of ``direction`` added to block ``layer``'s output at ``pos`` with margin >= 2."""
    for s in grid:
        if margin(run(model, adapter, ids, layer, pos, s * direction), t) >= 2:
            return s
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="records (first n of the 837-record file)")
    ap.add_argument("--subject-layers", default="3,5,8,12,16,20")
    ap.add_argument("--last-layers", default="16,20,23,26")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    subj_layers = [int(x) for x in args.subject_layers.split(",")]
    last_layers = [int(x) for x in args.last_layers.split(",")]
    model, tok = se.load_model("smollm2-135m")
    adapter = ModelAdapter(model)
    dmat = adapter.decoding_matrix().detach()
    out: dict = {"subject_decoding": {L: [] for L in subj_layers},
                 "subject_icl": {L: {s: [] for s in (1, 2, 4, 8)} for L in subj_layers},
                 "last_icl_margin": {L: [] for L in last_layers}, "last_decoding_margin": {L: [] for L in last_layers},
                 "last_icl_norm_needed": {L: [] for L in last_layers},
                 "last_decoding_norm_needed": {L: [] for L in last_layers}, "icl_correct": []}
    n = 0
    with torch.no_grad():
        for rec in load_records(n=args.n):
            req = make_request(rec)
            ids = encode_prompt(tok, req.text)
            ctx = encode_prompt(tok, f"{req.text}{req.target_new}.\n{req.text}")
            off = len(ctx) - len(ids)
            if ctx[off:] != ids:  # the second mention must tokenize like the bare prompt
                continue
            n += 1
            t = encode_target(tok, req.text, req.target_new)[0]
            end = req.text.index(req.subject) + len(req.subject)
            p = len(encode_prompt(tok, req.text[:end])) - 1
            d_hat = dmat[t] / dmat[t].norm()
            out["icl_correct"].append(bool(run(model, adapter, ctx).argmax() == t))
            for L in subj_layers:
                out["subject_decoding"][L].append(norm_needed(model, adapter, ids, L, p, d_hat, t))
                bare, icl = [], []
                run(model, adapter, ids, L, keep=bare)
                run(model, adapter, ctx, L, keep=icl)
                delta = icl[0][off + p] - bare[0][p]
                for s in (1, 2, 4, 8):
                    out["subject_icl"][L][s].append(margin(run(model, adapter, ids, L, p, s * delta), t))
            for L in last_layers:
                bare, icl = [], []
                run(model, adapter, ids, L, keep=bare)
                run(model, adapter, ctx, L, keep=icl)
                delta = icl[0][-1] - bare[0][-1]
                out["last_icl_margin"][L].append(margin(run(model, adapter, ids, L, -1, delta), t))
                out["last_decoding_margin"][L].append(margin(run(model, adapter, ids, L, -1, delta.norm() * d_hat), t))
                out["last_icl_norm_needed"][L].append(norm_needed(model, adapter, ids, L, -1, delta / delta.norm(), t))
                out["last_decoding_norm_needed"][L].append(norm_needed(model, adapter, ids, L, -1, d_hat, t))
    pct = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    summary = {"records": n, "in_context_prompt_top1": pct(out["icl_correct"]),
               "subject_decoding_reached_margin2": {L: pct([math.isfinite(v) for v in vs]) for L,
                                                    vs in out["subject_decoding"].items()},
               "subject_icl_top1": {L: {s: pct([m > 0 for m in ms]) for s, ms in by.items()} for L,
                                    by in out["subject_icl"].items()},
               "last_icl_top1": {L: pct([m > 0 for m in ms]) for L, ms in out["last_icl_margin"].items()},
               "last_decoding_same_norm_top1": {L: pct([m > 0 for m in ms]) for L,
                                                ms in out["last_decoding_margin"].items()},
               "last_icl_norm_needed_median": {L: statistics.median(v) for L, v in out["last_icl_norm_needed"].items()},
               "last_decoding_norm_needed_median": {L: statistics.median(v) for L,
                                                    v in out["last_decoding_norm_needed"].items()}}
    for k, v in summary.items():
        print(f"{k}: {v}", flush=True)
    atomic_write_json(Path(args.out), {"what": __doc__, "summary": summary, "per_record": out,
                                       "records": f"first {args.n} of the 837-record CounterFact file",
                                       "provenance": provenance(model)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
