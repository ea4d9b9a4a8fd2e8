"""MEMIT's and AlphaEdit's spreading of the ``z*`` residual over their layers: at each layer, the keys of every
request and the part of the residual left for it, then one update solved per layer (MEMIT's least squares,
AlphaEdit's null-space projected one) and applied before the next layer's keys are read."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...core.deltas import WeightDelta, put_back
from ...core.errors import ShiftEditError
from ...core.requests import EditRequest
from ...model.hooks import owned_hooks
from ...model.scoring import pad_batch, pad_id_of
from .contexts import encode_with_fact_index, prompt_template, template_groups
from .locate_hparams import ZStarHyperParams
from .zstar import add_canonical_


@torch.no_grad()
def _keys_and_residual(model, tok, adapter, layer: int, z_layer: int, reqs, templates, fact_token,
                       groups: list[int] | None = None):
    """Per request: the FF2 input of ``layer`` at the fact token averaged over contexts (``groups``: sizes of
    consecutive context types, averaged within each, then across; ``None``: one flat mean), and the residual
    after ``z_layer`` at the fact token of the bare prompt."""
    device = next(model.parameters()).device
    name = adapter.ff2_name(layer)
    seqs, idxs = [], []
    for req in reqs:
        ptmpl = prompt_template(req)
        for ctx in templates:
            ids, idx = encode_with_fact_index(tok, ctx.replace("{}", ptmpl, 1), req.subject or "", fact_token)
            seqs.append(ids)
            idxs.append(idx)
    ids, mask = pad_batch(seqs, pad_id_of(tok), device)
    cap: dict[str, torch.Tensor] = {}
    with owned_hooks() as hooks:
        hooks.forward_pre_hook(adapter.module(name), lambda _m, a: cap.__setitem__("x", a[0].detach()))
        res = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    x = cap["x"].view(len(seqs), ids.shape[1], -1)
    rows = torch.arange(len(seqs), device=device)
    pos = torch.tensor(idxs, device=device)
    per_context = x[rows, pos].float().view(len(reqs), len(templates), -1)
    if groups is None:
        k = per_context.mean(1)
    else:
        if sum(groups) != len(templates):
            raise ShiftEditError(f"context groups {groups} do not cover the {len(templates)} context templates")
        k = torch.stack([g.mean(1) for g in per_context.split(groups, dim=1)], 1).mean(1)
    hid = res.hidden_states[z_layer + 1][rows, pos].float().view(len(reqs), len(templates), -1)[:, 0]
    return k, hid


def spread_over_layers(
    model: nn.Module, tok, adapter, layers: list[int], z: torch.Tensor, requests: list[EditRequest],
    templates: list[str], fact_token: str,
    solve: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]],
    groups: list[int] | None = None,
) -> tuple[list[WeightDelta], dict[int, dict], dict[int, torch.Tensor]]:
    """MEMIT's spreading of ``z*`` (written at the residual after ``layers[-1]``) over ``layers``, in order.

    At each layer: the keys ``K`` ``[in, N]`` (context means per ``groups``, see :func:`key_groups`) and the
    residual still to write, an equal share of what the
    remaining layers must add (``[out, N]``, both float64), and the factors ``solve(layer, K, resid) ->
    (left, right, extra info)`` of the update ``left @ right``, applied temporarily so that the next layer's keys
    and residual see it. Every weight is restored at the end, also on an error.

    Returns ``(deltas, per-layer info, per-layer keys [N, in] float32)``.
    """
    modules = {layer: adapter.module(adapter.ff2_name(layer)) for layer in layers}
    originals = {layer: m.weight.detach().clone() for layer, m in modules.items()}
    deltas: list[WeightDelta] = []
    layer_info: dict[int, dict] = {}
    keys: dict[int, torch.Tensor] = {}
    try:
        for j, layer in enumerate(layers):
            k, h = _keys_and_residual(model, tok, adapter, layer, layers[-1], requests, templates, fact_token, groups)
            resid = (z - h.double().cpu()).T / (len(layers) - j)  # [out, N]
            left, right, extra = solve(layer, k.double().cpu().T, resid)
            update = left @ right
            deltas.append(WeightDelta(adapter.ff2_name(layer), adapter.layout(modules[layer]), left=left.float(),
                                      right=right.float(), layer=layer))
            add_canonical_(modules[layer], update)
            keys[layer] = k.float().cpu()
            layer_info[layer] = {"resid_norm": float(resid.norm()), "update_norm": float(update.norm()), **extra}
    finally:
        put_back((m.weight, originals[layer]) for layer, m in modules.items())
    return deltas, layer_info, keys


def key_groups(hparams: ZStarHyperParams) -> list[int] | None:
    """The context-type sizes the keys are averaged over (``key_average: per_type``), or ``None`` (``flat``)."""
    return template_groups(hparams.context_template_length_params) if hparams.key_average == "per_type" else None
