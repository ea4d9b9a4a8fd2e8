"""Prototype (not a registered algorithm): a forward-only edit that rewrites one FF neuron per target token.

SmolLM2 (gated MLP: ``down(SiLU(gate h) * up h)``) only. For each target token of a request, at layer ``L``:

1. one batched forward pass over the prompt and the template filled with 16 other subjects (teacher-forced on
   the target) gives ``h`` (the input of gate/up) at the target positions; each token's neuron is kept silent on
   the contrastive prompts and on the prompt's other target positions (``--hard-negatives N``: and on the N
   WikiText tokens it would fire on most);
2. the key ``w`` on ``h``: least ``wᵀ(Σ + w_c Σ h̃_c h̃_cᵀ)w`` with ``wᵀ(h_e - μ) = 1`` and ``wᵀμ = 0`` (so that
   ``wᵀh = wᵀ(h - μ)`` needs no bias; ``μ, Σ`` from WikiText tokens, ``h̃_c = h_c - μ``);
3. the neuron ``j`` that costs generic text least (smallest ``E[x_j²] ‖W_down[:, j]‖²`` from the cached FF2
   statistics), not used by an earlier edit, gets ``gate_j = α w`` (``α = 10``), ``up_j = w``: its activation is
   ``SiLU(α z) z`` (~0 below the generic mean, ``z²``-like above, 1 at the edit);
   (``up_j`` is divided by ``SiLU(α)`` so that the activation is 1 at the edit);
4. ``W_down[:, j] = s D̂[t]`` with ``s`` the smallest push giving the token a logit margin (two batched passes
   of 12 candidate pushes each, blocks ``L..`` re-run from the recorded block input), as SHIFT_PLUS; if no push
   up to ``--max-push`` reaches it, the neurons are restored and the edit counts as failed.

Edits are applied one after another and never undone; retention is measured as in ``sequential.py``
(hold = strict top-1 of every record edited so far, both families on the records edited so far, perplexity).

    SHIFT_EDIT_DATA=../shared/data python eval/shift_plus/neuron_prototype.py --n 100 \\
        --out eval/reports/shift_plus/neuron_prototype.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.algorithms.shift_plus import ShiftPlusHyperParams, _build, _margins, search_push
from shift_edit.architectures import ModelAdapter
from shift_edit.bench.data import load_counterfact
from shift_edit.bench.wikitext import PerplexityProtocol, perplexity, read_wikitext_lines
from shift_edit.covariance import layer_stats
from shift_edit.hooks import capture_inputs, owned_hooks
from shift_edit.io import atomic_write_json, provenance
from shift_edit.requests import encode_prompt, encode_target
from shift_edit.resume import record_block_inputs, resume_at
from shift_edit.scoring import pad_batch, pad_id_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sequential import group_metrics, hold_rate  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def generic_inputs(model, tok, name: str, lines: list[str], n_tokens: int) -> torch.Tensor:
    """``name``'s input at ``n_tokens`` WikiText tokens ``[n_tokens, d]`` (float64; lines cut at 128 tokens)."""
    hs, n = [], 0
    for line in lines:
        ids = encode_prompt(tok, line)[:128]
        if len(ids) < 8:
            continue
        with capture_inputs(model, [name]) as cap:
            model(input_ids=torch.tensor([ids]))
        hs.append(cap.inputs[name][0].double())
        n += len(ids)
        if n >= n_tokens:
            break
    return torch.cat(hs)[:n_tokens]


def neuron_key(h_e: torch.Tensor, h_c: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, w_c: float) -> torch.Tensor:
    """``w`` with ``wᵀ(h_e - μ) = 1``, ``wᵀμ = 0``, least ``wᵀAw`` (``A = Σ + w_c Σ h̃_c h̃_cᵀ``)."""
    hc = h_c - mu
    a = sigma + w_c * hc.T @ hc + 1e-6 * float(torch.diagonal(sigma).mean()) * torch.eye(len(mu), dtype=torch.float64)
    b = torch.stack([h_e - mu, mu], 1)  # [d, 2]
    aib = torch.linalg.solve(a, b)
    return aib @ torch.linalg.solve(b.T @ aib, torch.tensor([1.0, 0.0], dtype=torch.float64))


@torch.no_grad()
def edit_one(model, tok, adapter, req, layer: int, mu, sigma, order: list[int], used: set[int], hp: dict,
             generic: torch.Tensor) -> dict:
    """Rewrite one neuron per target token of ``req`` (in place); returns the edit's info."""
    gate, up = (adapter.module(n) for n in adapter.ff1_names(layer))
    down = adapter.module(adapter.ff2_name(layer))
    dmat = adapter.decoding_matrix().detach()
    target = encode_target(tok, req.text, req.target_new)
    # the prompt and the template filled with other subjects, teacher-forced: SHIFT_PLUS's own batch
    batch = _build(tok, req, ShiftPlusHyperParams(layers=[layer], n_prefixes=0, n_contrast=hp["n_contrast"]), target)
    seqs, positions, n_texts = batch.seqs, batch.positions, len(batch.seqs)
    ids, mask = pad_batch(seqs, pad_id_of(tok), next(model.parameters()).device)
    name = adapter.ff1_names(layer)[0]
    with record_block_inputs(adapter) as blocks_in, capture_inputs(model, [name]) as cap:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if bool((logits[0, positions[0]].argmax(-1).cpu() == torch.tensor(target)).all()):
        return {"skipped": True, "passes": 1}
    h = cap.inputs[name].double()
    block_in = blocks_in[layer][:1]
    neurons, dirs, saved = [], [], []
    for i, t in enumerate(target):
        # silent on the contrastive prompts at this position and on the prompt's other target positions
        others = [h[0, p] for k, p in enumerate(positions[0]) if k != i]
        silent = torch.stack([h[r, positions[r][i]] for r in range(1, n_texts)] + others)
        w = neuron_key(h[0, positions[0][i]], silent, mu, sigma, hp["contrast_weight"])
        if hp["hard_negatives"]:  # the generic tokens it fires on most are made silent too (one more solve)
            top = (generic @ w).topk(hp["hard_negatives"]).indices
            w = neuron_key(h[0, positions[0][i]], torch.cat([silent, generic[top]]), mu, sigma, hp["contrast_weight"])
        j = next(n for n in order if n not in used)
        used.add(j)
        saved.append((j, gate.weight[j].clone(), up.weight[j].clone(), down.weight[:, j].clone()))
        gate.weight[j] = (hp["alpha"] * w).to(gate.weight.dtype)
        up.weight[j] = (w / torch.nn.functional.silu(torch.tensor(hp["alpha"], dtype=torch.float64))).to(up.weight.dtype)
        down.weight[:, j] = 0
        neurons.append(j)
        dirs.append(dmat[t] / dmat[t].norm())
    cols = torch.stack(dirs, 1)  # [d_out, n_tok]: neuron i writes direction i

    def margin_rows(scales: torch.Tensor) -> torch.Tensor:
        def hook(_m, args, out):
            x = args[0][..., neurons]  # the new neurons' activations
            return out + scales.view(-1, 1, 1) * (x @ cols.T)

        with owned_hooks() as hooks, resume_at(adapter, layer, block_in.repeat(len(scales), 1, 1)):
            hooks.forward_hook(down, hook)
            lg = model(input_ids=ids[:1].repeat(len(scales), 1), attention_mask=mask[:1].repeat(len(scales), 1),
                       use_cache=False).logits
        return _margins(lg, positions[:1], target, list(range(len(scales))))

    hi, search = search_push(lambda grid: margin_rows(grid.float()) >= hp["margin"], hp["max_push"], 12, 2)
    passes = 1 + search
    if hi is None:  # the margin is out of reach: leave the model as it was (the neurons stay free)
        for j, g_row, u_row, d_col in saved:
            gate.weight[j], up.weight[j], down.weight[:, j] = g_row, u_row, d_col
            used.discard(j)
        return {"skipped": False, "passes": passes, "push": None, "neurons": [], "reached": False}
    down.weight[:, neurons] = (hi * cols).to(down.weight.dtype)
    return {"skipped": False, "passes": passes, "push": hi, "neurons": neurons, "reached": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layer", type=int, default=23)
    ap.add_argument("--data", default="counterfact-easyedit-edit.json")
    ap.add_argument("--checkpoints", default="25,50")
    ap.add_argument("--generic-tokens", type=int, default=6000)
    ap.add_argument("--margin", type=float, default=0.25)
    ap.add_argument("--n-contrast", type=int, default=16)
    ap.add_argument("--contrast-weight", type=float, default=1000.0)
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--max-push", type=float, default=400.0)
    ap.add_argument("--hard-negatives", type=int, default=0,
                    help="also keep each neuron silent on the N generic tokens it would fire on most")
    ap.add_argument("--eval-records", type=int, default=100)
    ap.add_argument("--ppl-lines", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--remove-only", default=None, metavar="N,N,...",
                    help="no edits: zero the N cheapest neurons' down columns and report the perplexity ratio")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hp = {"margin": args.margin, "n_contrast": args.n_contrast, "contrast_weight": args.contrast_weight,
          "alpha": args.alpha, "max_push": args.max_push, "hard_negatives": args.hard_negatives}
    model, tok = se.load_model("smollm2-135m")
    adapter = ModelAdapter(model)
    L = args.layer
    lines = read_wikitext_lines(str(DATA / "wikitext-2-raw-v1" / "wiki.test.nonblank.raw"))
    proto = PerplexityProtocol(n_lines=args.ppl_lines, max_tokens=args.ppl_tokens)
    base_ppl = perplexity(model, tok, lines, proto)
    with torch.no_grad():
        generic = generic_inputs(model, tok, adapter.ff1_names(L)[0], lines[200:], args.generic_tokens)
    mu, sigma = generic.mean(0), torch.cov((generic - generic.mean(0)).T)
    c = layer_stats(model, tok, [L], n_tokens=50_000, max_length=128, progress=False)[L].mom2.double()
    cost = torch.diagonal(c) * (adapter.module(adapter.ff2_name(L)).weight.detach().double() ** 2).sum(0)
    order = [int(j) for j in cost.argsort()]
    if args.remove_only:  # is giving up the neurons what costs perplexity?
        down = adapter.module(adapter.ff2_name(L))
        orig, energy = down.weight.detach().clone(), float(torch.trace(down.weight.double() @ c @ down.weight.double().T))
        removed = []
        for n in (int(x) for x in args.remove_only.split(",")):
            with torch.no_grad():
                down.weight.copy_(orig)
                down.weight[:, order[:n]] = 0
            removed.append({"neurons": n, "ppl_ratio": perplexity(model, tok, lines, proto) / base_ppl,
                            "summed_cost": float(cost[order[:n]].sum()) / energy})
            print(removed[-1], flush=True)
        with torch.no_grad():
            down.weight.copy_(orig)
        atomic_write_json(Path(args.out), {"what": "perplexity ratio with the N cheapest neurons of layer "
                                           f"{L} removed (down columns zeroed), no edit", "args": vars(args),
                                           "removed": removed, "provenance": provenance(model)})
        return 0
    cases = load_counterfact(DATA / args.data, limit=args.n)
    probe = cases[: args.eval_records]
    before = group_metrics(model, tok, probe)
    checkpoints = sorted({int(x) for x in args.checkpoints.split(",")} | {len(cases)})
    used: set[int] = set()
    rows, infos, times = [], [], []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        infos.append(edit_one(model, tok, adapter, case.request, L, mu, sigma, order, used, hp, generic))
        times.append(time.perf_counter() - t0)
        if i in checkpoints:
            applied = [x for x in infos if not x["skipped"]]
            row = {"edits": i, "hold_top1": hold_rate(model, tok, cases[:i]),
                   "ppl_ratio": perplexity(model, tok, lines, proto) / base_ppl,
                   "probe": group_metrics(model, tok, probe[: min(i, len(probe))]),
                   "neurons_used": len(used),
                   "push_median": statistics.median([x["push"] for x in applied if x["push"] is not None] or [0.0]),
                   "reached_margin": sum(x["reached"] for x in applied), "applied": len(applied),
                   "edit_time_median_s": statistics.median(times)}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "probe"},
                  {k: round(v, 1) for k, v in row["probe"].items() if "success" in k}, flush=True)
            atomic_write_json(Path(args.out), {
                "what": __doc__, "args": vars(args), "unedited_probe": before, "base_ppl": base_ppl,
                "generic_cost_of_first_neurons": [float(cost[j]) for j in order[: len(used)]],
                "checkpoints": rows, "edits": [{"case_id": c.case_id, "n_target_tokens": len(encode_target(
                    tok, c.request.text, c.request.target_new)), **x} for c, x in zip(cases, infos)],
                "provenance": provenance(model)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
