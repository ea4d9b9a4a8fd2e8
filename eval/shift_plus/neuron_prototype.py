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

Options measured after the first runs (they became the registered algorithm SHIFT_NEURON,
``shift_edit/algorithms/shift_neuron.py``): ``--beta`` gives the gate a threshold without a bias
(``wᵀμ = -β``, the edit at ``1 - β``) and the up row a near-constant key (1 at the edit and at ``μ``);
``--multi free`` gives no neuron to a continuation token the model already gives at the margin, and
no contrastive silence after the first token; ``--layers`` spreads the edits round robin.

Edits are applied one after another and never undone; retention is measured as in ``sequential.py``
(hold = strict top-1 of every record edited so far, both families on the records edited so far, perplexity).

    SHIFT_EDIT_DATA=../shared/data python eval/shift_plus/neuron_prototype.py --n 100 \\
        --out eval/reports/shift_plus/neuron_prototype.json
    ... --beta 0.7 --alpha 25 --multi free --max-push 1200 --out .../neuron_threshold_b07_free_mp1200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.algorithms.shift.push import build_batch, margins, search_push
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.bench.wikitext import PerplexityProtocol, perplexity, read_wikitext_lines
from shift_edit.core.requests import encode_prompt, encode_target
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.covariance import layer_stats
from shift_edit.model.hooks import capture_inputs, owned_hooks
from shift_edit.model.resume import record_block_inputs, resume_at
from shift_edit.model.scoring import pad_batch, pad_id_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sequential import group_metrics, hold_rate  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def generic_inputs(model, tok, names: list[str], lines: list[str], n_tokens: int) -> dict[str, torch.Tensor]:
    """Each of ``names``' input at ``n_tokens`` WikiText tokens ``[n_tokens, d]`` (float64; lines cut at 128
    tokens)."""
    hs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    n = 0
    for line in lines:
        ids = encode_prompt(tok, line)[:128]
        if len(ids) < 8:
            continue
        with capture_inputs(model, names) as cap:
            model(input_ids=torch.tensor([ids]))
        for name in names:
            hs[name].append(cap.inputs[name][0].double())
        n += len(ids)
        if n >= n_tokens:
            break
    return {name: torch.cat(h)[:n_tokens] for name, h in hs.items()}


def neuron_key(h_e: torch.Tensor, h_c: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, w_c: float,
               at_edit: float = 1.0, at_mean: float = 0.0) -> torch.Tensor:
    """``w`` with ``wᵀ(h_e - μ) = at_edit``, ``wᵀμ = at_mean``, least ``wᵀAw`` (``A = Σ + w_c Σ h̃_c h̃_cᵀ``).

    ``at_mean = -β < 0`` gives the neuron a threshold without a bias: generic tokens sit at ``-β`` (± their spread
    ``√(wᵀΣw)``), the edit at ``at_edit - β``."""
    hc = h_c - mu
    a = sigma + w_c * hc.T @ hc + 1e-6 * float(torch.diagonal(sigma).mean()) * torch.eye(len(mu), dtype=torch.float64)
    b = torch.stack([h_e - mu, mu], 1)  # [d, 2]
    aib = torch.linalg.solve(a, b)
    return aib @ torch.linalg.solve(b.T @ aib, torch.tensor([at_edit, at_mean], dtype=torch.float64))


@torch.no_grad()
def edit_one(model, tok, adapter, req, layer: int, mu, sigma, order: list[int], used: set[int], hp: dict,
             generic: torch.Tensor) -> dict:
    """Rewrite one neuron per target token of ``req`` (in place); returns the edit's info."""
    gate, up = (adapter.module(n) for n in adapter.ff1_names(layer))
    down = adapter.module(adapter.ff2_name(layer))
    dmat = adapter.decoding_matrix().detach()
    target = encode_target(tok, req.text, req.target_new)
    # the prompt and the template filled with other subjects, teacher-forced: SHIFT_PLUS's own batch
    batch = build_batch(tok, req, target, n_prefixes=0, n_contrast=hp["n_contrast"])
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
        if hp["multi"] == "free" and i > 0:
            # a continuation token the model already gives at the margin gets no neuron
            lg = logits[0, positions[0][i]].float()
            if float(lg[t] - lg.scatter(0, torch.tensor([t]), float("-inf")).max()) >= hp["margin"]:
                continue
        # silent on the contrastive prompts at this position ("free": at the first target position only: a
        # continuation is as right after another subject) and on the prompt's other target positions
        others = [h[0, p] for k, p in enumerate(positions[0]) if k != i]
        contrast = [h[r, positions[r][i]] for r in range(1, n_texts)] if hp["multi"] != "free" or i == 0 else []
        silent = torch.stack(contrast + others) if contrast or others else h[0, :0]
        w = neuron_key(h[0, positions[0][i]], silent, mu, sigma, hp["contrast_weight"])
        if hp["hard_negatives"]:  # the generic tokens it fires on most are made silent too (one more solve)
            top = (generic @ w).topk(hp["hard_negatives"]).indices
            w = neuron_key(h[0, positions[0][i]], torch.cat([silent, generic[top]]), mu, sigma, hp["contrast_weight"])
        j = next(n for n in order if n not in used)
        used.add(j)
        saved.append((j, gate.weight[j].clone(), up.weight[j].clone(), down.weight[:, j].clone()))
        if hp["beta"] > 0:  # thresholded gate (generic at -β) times a near-constant up (1 at the edit and the mean)
            g = neuron_key(h[0, positions[0][i]], silent, mu, sigma, hp["contrast_weight"], 1.0, -hp["beta"])
            u = neuron_key(h[0, positions[0][i]], silent[:0], mu, sigma, 0.0, 0.0, 1.0)
            peak = torch.nn.functional.silu(torch.tensor(hp["alpha"] * (1.0 - hp["beta"]), dtype=torch.float64))
            gate.weight[j] = (hp["alpha"] * g).to(gate.weight.dtype)
            up.weight[j] = (u / peak).to(up.weight.dtype)
        else:
            gate.weight[j] = (hp["alpha"] * w).to(gate.weight.dtype)
            up.weight[j] = (w / torch.nn.functional.silu(torch.tensor(hp["alpha"], dtype=torch.float64))).to(
                up.weight.dtype)
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
        return margins(lg, positions[:1], target, list(range(len(scales))))

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
    ap.add_argument("--layers", default=None, metavar="L,L,...",
                    help="spread the edits over these layers, round robin by edit (default: --layer only)")
    ap.add_argument("--data", default="counterfact-easyedit-edit.json")
    ap.add_argument("--checkpoints", default="25,50")
    ap.add_argument("--generic-tokens", type=int, default=6000)
    ap.add_argument("--margin", type=float, default=0.25)
    ap.add_argument("--n-contrast", type=int, default=16)
    ap.add_argument("--contrast-weight", type=float, default=1000.0)
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--max-push", type=float, default=400.0)
    ap.add_argument("--multi", choices=["all", "free"], default="all",
                    help="multi-token targets: a neuron per token, each silent on the contrastive prompts (all), "
                         "or none for a continuation the model already gives, no contrast after the first (free)")
    ap.add_argument("--beta", type=float, default=0.0,
                    help="threshold: gate at -β on the generic mean (edit at 1-β) with a near-constant up row; "
                         "0 = gate and up both the key (the first prototype)")
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
          "alpha": args.alpha, "max_push": args.max_push, "hard_negatives": args.hard_negatives,
          "beta": args.beta, "multi": args.multi}
    model, tok = se.load_model("smollm2-135m")
    adapter = ModelAdapter(model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [args.layer]
    L = layers[0]
    lines = read_wikitext_lines(str(DATA / "wikitext-2-raw-v1" / "wiki.test.nonblank.raw"))
    proto = PerplexityProtocol(n_lines=args.ppl_lines, max_tokens=args.ppl_tokens)
    base_ppl = perplexity(model, tok, lines, proto)
    names = [adapter.ff1_names(layer)[0] for layer in layers]
    with torch.no_grad():
        generic_by_name = generic_inputs(model, tok, names, lines[200:], args.generic_tokens)
    stats = layer_stats(model, tok, layers, n_tokens=50_000, max_length=128, progress=False)
    per_layer = {}
    for layer, name in zip(layers, names):
        generic = generic_by_name[name]
        mu, sigma = generic.mean(0), torch.cov((generic - generic.mean(0)).T)
        c = stats[layer].mom2.double()
        cost = torch.diagonal(c) * (adapter.module(adapter.ff2_name(layer)).weight.detach().double() ** 2).sum(0)
        per_layer[layer] = {"generic": generic, "mu": mu, "sigma": sigma, "c": c, "cost": cost,
                            "order": [int(j) for j in cost.argsort()], "used": set()}
    c, cost, order = per_layer[L]["c"], per_layer[L]["cost"], per_layer[L]["order"]
    if args.remove_only:  # is giving up the neurons what costs perplexity?
        down = adapter.module(adapter.ff2_name(L))
        orig, energy = (
            down.weight.detach().clone(),
            float(torch.trace(down.weight.double() @ c @ down.weight.double().T)),
        )
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
    rows, infos, times = [], [], []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        layer = layers[(i - 1) % len(layers)]
        pl = per_layer[layer]
        infos.append({"layer": layer, **edit_one(model, tok, adapter, case.request, layer, pl["mu"], pl["sigma"],
                                                  pl["order"], pl["used"], hp, pl["generic"])})
        times.append(time.perf_counter() - t0)
        if i in checkpoints:
            applied = [x for x in infos if not x["skipped"]]
            row = {"edits": i, "hold_top1": hold_rate(model, tok, cases[:i]),
                   "ppl_ratio": perplexity(model, tok, lines, proto) / base_ppl,
                   "probe": group_metrics(model, tok, probe[: min(i, len(probe))]),
                   "neurons_used": sum(len(pl["used"]) for pl in per_layer.values()),
                   "push_median": statistics.median([x["push"] for x in applied if x["push"] is not None] or [0.0]),
                   "reached_margin": sum(x["reached"] for x in applied), "applied": len(applied),
                   "edit_time_median_s": statistics.median(times)}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "probe"},
                  {k: round(v, 1) for k, v in row["probe"].items() if "success" in k}, flush=True)
            atomic_write_json(Path(args.out), {
                "what": __doc__, "args": vars(args), "unedited_probe": before, "base_ppl": base_ppl,
                "generic_cost_of_first_neurons": {layer: [float(pl["cost"][j]) for j in pl["order"][: len(pl["used"])]]
                                                  for layer, pl in per_layer.items()},
                "checkpoints": rows, "edits": [{"case_id": c.case_id, "n_target_tokens": len(encode_target(
                    tok, c.request.text, c.request.target_new)), **x} for c, x in zip(cases, infos)],
                "provenance": provenance(model)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
