"""MEMIT: mass-editing memory in a transformer (Meng et al., 2023), written from the paper.

For a batch of N requests and edited layers ``l_1 < ... < l_L``:

1. ``z*_i``: for each request, δ_i is optimised at FF2's output of the last edited layer
   (adding to FF2's output there is adding to the residual stream ``h^L``), with the same
   loss as ROME's v* but clamped relative to the residual ``||h^L||``;
   ``z*_i = h^L_i + δ_i`` at the fact token of the bare prompt.
2. For each edited layer ``l_j`` in order: keys ``K = [k_1 .. k_N]`` (FF2 inputs at the fact
   token, averaged over the context templates, with the lower layers already edited),
   the remaining residual ``R = (z* - h^L) / (L - j + 1)`` (``h^L`` recomputed with the
   lower layers edited), and, in float64,
   ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (``λ = mom2_update_weight``, ``C = E[k kᵀ]``), stored as the
   factors ``left = R [out, N]``, ``right = ((λ C + K Kᵀ)⁻¹ K)ᵀ [N, in]``: rank ≤ N.

The weights are changed while computing (each layer's update is needed for the next)
and restored before returning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ...core.deltas import WeightDelta, put_back
from ...core.errors import ShiftEditError
from ...model.hooks import owned_hooks
from ...files.io import model_fingerprint, read_verified, write_verified
from ...model.loading import cache_dir
from ...core.registry import Computed, register
from ...core.requests import EditRequest
from ...model.scoring import pad_batch, pad_id_of
from ...model.covariance import layer_stats
from ..common import adapter_for, already_predicted
from .rome import (
    LocateEditHyperParams,
    add_canonical_,
    context_templates,
    encode_with_fact_index,
    optimise_delta,
    prompt_template,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class ZStarHyperParams(LocateEditHyperParams):
    """The ``z*`` settings MEMIT and AlphaEdit share (MEMIT's defaults); see
    :class:`MEMITHyperParams` for their meaning."""

    clamp_norm_factor: float = 0.75
    context_template_length_params: list[list[int]] = dataclasses.field(default_factory=lambda: [[10, 5]])
    fact_token: Literal["subject_last", "subject_first", "last"] = "subject_last"
    zstar_cache: bool = False


@dataclasses.dataclass(kw_only=True)
class MEMITHyperParams(ZStarHyperParams):
    """Hparams of MEMIT.

    Attributes:
        mom2_update_weight: λ, the weight of the preserved keys' second moment.
        mom2_adjustment: use ``λ C`` (on) or ``λ I`` (off) in the solve.
        context_template_length_params: MEMIT's code uses ``[[10, 5]]`` (5 contexts of 10
            new tokens) plus the bare prompt.
        zstar_cache: keep each request's ``z*`` on disk (``cache_dir()/zstar``), keyed by the
            model fingerprint, the request and every hparam ``z*`` depends on, and reuse it.
            ``z*`` of a request does not depend on the other requests of a batch, so runs at
            several ``--num-edits`` (or repeated runs) optimise each ``z*`` once. Results are
            identical either way.
    """

    ALG_NAME = "MEMIT"

    mom2_update_weight: float = 15000.0
    mom2_adjustment: bool = True

    def validate(self) -> None:
        super().validate()
        if not self.mom2_update_weight > 0:
            self._fail("mom2_update_weight", self.mom2_update_weight, "it must be > 0")


@torch.no_grad()
def _keys_and_residual(model, tok, adapter, layer: int, z_layer: int, reqs, templates, fact_token):
    """Per request: the FF2 input of ``layer`` at the fact token averaged over contexts,
    and the residual after ``z_layer`` at the fact token of the bare prompt."""
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
    k = x[rows, pos].float().view(len(reqs), len(templates), -1).mean(1)
    hid = res.hidden_states[z_layer + 1][rows, pos].float().view(len(reqs), len(templates), -1)[:, 0]
    return k, hid


def compute_memit(model: nn.Module, tok, requests: list[EditRequest], hparams: MEMITHyperParams) -> Computed:
    """MEMIT's per-layer factors for a batch of requests, computed against ``model``."""
    adapter = adapter_for(model, hparams)
    layers = sorted({adapter.check_layer(layer) for layer in hparams.layers})
    if layers[-1] >= adapter.n_layers - 1:
        raise ShiftEditError(
            f"MEMIT cannot edit the model's last layer ({layers[-1]}): z* is read from the residual after it"
        )
    z_layer = layers[-1]
    skipped = already_predicted(model, tok, requests) if hparams.skip_if_predicted else [False] * len(requests)
    active = [r for r, s in zip(requests, skipped) if not s]
    if not active:
        return Computed([], skipped, [{} for _ in requests])
    covs = {}
    if hparams.mom2_adjustment:
        stats = layer_stats(model, tok, layers, corpus=hparams.mom2_corpus, n_tokens=hparams.mom2_n_tokens,
                            max_length=hparams.mom2_max_length, dtype=hparams.mom2_dtype, adapter=adapter)
        covs = {layer: s.mom2.double() for layer, s in stats.items()}
    templates = context_templates(model, tok, hparams.context_template_length_params, hparams.context_seed)
    z, z_info = target_zs(model, tok, adapter, z_layer, active, templates, hparams)

    def solve(layer: int, K: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        C = covs[layer] if layer in covs else torch.eye(K.shape[0], dtype=torch.float64)
        adj = torch.linalg.solve(hparams.mom2_update_weight * C + K @ K.T, K)  # [in, N]
        return resid, adj.T, {}

    deltas, layer_info, _keys = spread_over_layers(model, tok, adapter, layers, z, active, templates,
                                                   hparams.fact_token, solve)
    return Computed(deltas, skipped, request_info(skipped, z_info, layer_info))


def spread_over_layers(
    model: nn.Module, tok, adapter, layers: list[int], z: torch.Tensor, requests: list[EditRequest],
    templates: list[str], fact_token: str,
    solve: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]],
) -> tuple[list[WeightDelta], dict[int, dict], dict[int, torch.Tensor]]:
    """MEMIT's spreading of ``z*`` (written at the residual after ``layers[-1]``) over ``layers``, in order.

    At each layer: the keys ``K`` ``[in, N]`` and the residual still to write, an equal share of what the
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
            k, h = _keys_and_residual(model, tok, adapter, layer, layers[-1], requests, templates, fact_token)
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


def request_info(skipped: list[bool], z_info: list[dict], layer_info: dict[int, dict]) -> list[dict]:
    """Per request: ``{}`` when skipped, else its ``z*`` details and the per-layer info."""
    it = iter(z_info)
    return [{} if s else {**next(it), "layers": layer_info} for s in skipped]


def target_zs(model: nn.Module, tok, adapter, z_layer: int, requests: list[EditRequest], templates: list[str],
              hparams: MEMITHyperParams) -> tuple[torch.Tensor, list[dict]]:
    """MEMIT's ``z*`` of each request (``[N, d_model]`` float64, CPU) at the residual after
    ``z_layer``, with per-request optimisation details; from the on-disk cache when
    ``hparams.zstar_cache`` is on (MEMIT and AlphaEdit share it: same hparams, same ``z*``)."""
    z_info = []
    zs = []
    fingerprint = model_fingerprint(model) if getattr(hparams, "zstar_cache", False) else None
    device = next(model.parameters()).device
    for req in requests:
        entry = _zstar_entry(fingerprint, device.type, z_layer, req, hparams) if fingerprint else None
        hit = _zstar_load(*entry) if entry else None
        if hit is None:
            dr = optimise_delta(model, tok, adapter, z_layer, req, templates, hparams, ref="residual")
            hit = ((dr.ref + dr.delta).cpu(), {"delta_norm": float(dr.delta.norm()), "ref_norm": float(dr.ref.norm()),
                                               "steps": dr.steps, "loss_first": dr.losses[0], "loss_last": dr.losses[-1]})
            if entry:
                pt, meta_path, expected = entry
                write_verified(pt, meta_path, {"z": hit[0].contiguous()}, {**expected, "info": hit[1]})
        else:
            hit[1]["zstar_from_cache"] = True
        zs.append(hit[0])
        z_info.append(hit[1])
    return torch.stack(zs).double(), z_info


_ZSTAR_FORMAT = 2  # 2: tensor file plus verified metadata (io.write_verified)
#: hparams z* depends on (the layers only through the last one, z_layer)
_ZSTAR_FIELDS = ("fact_token", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                 "loss_stop", "context_template_length_params", "context_seed", "ff1_templates", "ff2_template", "final_norm")


def _zstar_entry(fingerprint: str, device: str, z_layer: int, req: EditRequest, hparams: MEMITHyperParams
                 ) -> tuple[Path, Path, dict]:
    """The cache entry of one request's ``z*``: tensor file, metadata file, and the metadata it must hold."""
    hp = hparams.to_dict()
    key = {"z_layer": z_layer, "device": device, "request": {k: v for k, v in req.to_dict().items() if k != "case_id"},
           "hparams": {k: hp.get(k) for k in _ZSTAR_FIELDS}, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_dir() / "zstar" / fingerprint
    expected = {"format_version": _ZSTAR_FORMAT, "model_fingerprint": fingerprint, "key": json.loads(json.dumps(key))}
    return folder / f"{digest}.pt", folder / f"{digest}.json", expected


def _zstar_load(pt: Path, meta_path: Path, expected: dict) -> tuple[torch.Tensor, dict] | None:
    """A cached ``z*`` and its details, verified (:func:`~shift_edit.files.io.read_verified`); ``None`` otherwise."""
    read = read_verified(pt, meta_path, expected, "z* cache")
    if read is None:
        return None
    meta, tensors = read
    z, info = tensors.get("z"), meta.get("info")
    if not isinstance(z, torch.Tensor) or z.dim() != 1 or not torch.isfinite(z).all() or not isinstance(info, dict):
        log.warning("z* cache %s holds a bad entry; recomputing", pt)
        return None
    return z, dict(info)


register("MEMIT", MEMITHyperParams, compute_memit,
         "mass-editing memory (Meng et al. 2023): batch edits spread over several layers, rank <= N per layer")
