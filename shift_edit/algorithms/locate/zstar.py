"""The target value ROME, MEMIT and AlphaEdit fit (ROME's ``v*``, MEMIT's ``z*``), and what they share around it.

- :func:`optimise_delta`: a vector ``δ`` added at the fact token of every context, optimised with Adam for the
  target's NLL plus ``kl_factor`` x KL and a weight decay (:func:`v_loss`), its norm clamped after each step
  (:func:`clamped_step`); SHIFT_SUBJECT's value fit uses the same loss and step;
- :func:`target_zs`: MEMIT's and AlphaEdit's ``z*`` per request, optionally cached on disk (verified);
- temporary in-place updates of FF2 in the canonical ``[out, in]`` orientation (:func:`add_canonical_`).

The hparams are :mod:`.locate_hparams`, the contexts :mod:`.contexts`; spreading ``z*`` over several layers is
:mod:`.spread`.
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
import torch.nn.functional as F
from torch import nn

from ...core.requests import EditRequest, encode_target
from ...files.io import model_fingerprint, read_verified, write_verified
from ...model.architectures import from_param_layout, weight_layout
from ...model.hooks import OwnedHooks, head_only_at
from ...model.loading import cache_dir
from ...model.resume import BlockRecorder
from ...model.scoring import pad_batch, pad_id_of
from .contexts import encode_with_fact_index, prompt_template
from .locate_hparams import LocateEditHyperParams, ZStarHyperParams

log = logging.getLogger(__name__)


class _AddAt:
    """A forward hook that adds ``delta`` to a module's output at given (row, position)s."""

    def __init__(self, rows: torch.Tensor, pos: torch.Tensor, seq: int):
        self.rows, self.pos, self.seq = rows, pos, seq
        self.delta: torch.Tensor | None = None

    def __call__(self, _module, _args, output):
        if self.delta is None:
            return output
        flat = output.ndim == 2
        out = output.view(-1, self.seq, output.shape[-1]) if flat else output
        add = torch.zeros_like(out)
        add[self.rows, self.pos] = self.delta.to(out.dtype)
        out = out + add
        return out.view(output.shape) if flat else out


class _AddThrough:
    """A forward hook that adds the rank-one update ``delta · (uᵀx) * scale`` at every position
    (``x`` the module's input): the effect of ``W += scale · delta uᵀ`` on the output."""

    def __init__(self, u: torch.Tensor, scale: float):
        self.u, self.scale = u, scale
        self.delta: torch.Tensor | None = None

    def __call__(self, _module, args, output):
        if self.delta is None:
            return output
        coef = (args[0].float() @ self.u.to(args[0].device, torch.float32)) * self.scale
        return output + (coef[..., None] * self.delta.to(output.device)).to(output.dtype)


@dataclasses.dataclass
class DeltaResult:
    """The optimised δ of one request."""

    delta: torch.Tensor  # [d_model] float32
    ref: torch.Tensor  # the original vector at the subject position (FF2 output or residual)
    keys: torch.Tensor  # [n_contexts, d_in] FF2 inputs at the fact token, per context (row 0: the bare prompt)
    steps: int
    losses: list[float]

    @property
    def bare_key(self) -> torch.Tensor:
        """[d_in] FF2 input at the fact token of the bare prompt (context ``"{}"``)."""
        return self.keys[0]


def lambda_key_vector(keys: torch.Tensor, lambda_key: Literal["mean", "prompt"]) -> torch.Tensor:
    """The key ``k`` in ``Λ = δ / uᵀk``: the bare prompt's (``keys[0]``) or the context mean."""
    return keys[0] if lambda_key == "prompt" else keys.mean(0)


# length: ROME's v* loop as in the paper: the contexts' batch, the recorded block inputs and the Adam loop over δ
#   share their tensors; split, each piece would take most of them as arguments
def optimise_delta(
    model: nn.Module,
    tok,
    adapter,
    layer: int,
    req: EditRequest,
    templates: list[str],
    hp: LocateEditHyperParams,
    *,
    ref: Literal["ff2_output", "residual"],
    through_u: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lambda_key: Literal["mean", "prompt"] = "mean",
) -> DeltaResult:
    """Optimise δ added to FF2's output at ``layer`` at the fact token (ROME's v*, MEMIT's z*).

    ``ref`` is the vector whose norm scales the clamp and the weight decay: FF2's output
    (ROME) or the residual stream after ``layer`` (MEMIT). With ``through_u`` (``k* -> u``),
    δ is instead applied as the rank-one update ``δ uᵀ / uᵀk`` at every position
    (ROME's ``optimise_through_update``; ``k`` per ``lambda_key``).
    """
    device = next(model.parameters()).device
    name = adapter.ff2_name(layer)
    module = adapter.module(name)
    ptmpl = prompt_template(req)
    subject = req.subject or ""
    target = encode_target(tok, req.text, req.target_new)
    seqs, idxs, tgt_pos = [], [], []
    for ctx in templates:
        ids, idx = encode_with_fact_index(tok, ctx.replace("{}", ptmpl, 1), subject, hp.fact_token)
        tgt_pos.append(len(ids) - 1)
        seqs.append(ids + target[:-1])
        idxs.append(idx)
    kl_ids, kl_idx = encode_with_fact_index(tok, "{} is a", subject, hp.fact_token)
    n_rw = len(seqs)
    seqs.append(kl_ids)
    idxs.append(kl_idx)
    ids, mask = pad_batch(seqs, pad_id_of(tok), device)
    rows = torch.arange(len(seqs), device=device)
    pos = torch.tensor(idxs, device=device)
    tgt = torch.tensor(target, device=device)
    tpos = torch.tensor(tgt_pos, device=device)[:, None] + torch.arange(len(target), device=device)[None]

    hook = _AddAt(rows, pos, ids.shape[1])
    captured: dict[str, torch.Tensor] = {}

    def capture(_m, args, output):
        captured["in"] = args[0].detach()
        captured["out"] = output.detach()

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    hooks = OwnedHooks()
    handle = hooks.forward_hook(module, hook)
    try:
        with torch.no_grad():
            h2 = hooks.forward_hook(module, capture)
            try:
                recorder = BlockRecorder(adapter, layer)
                with recorder.batch():
                    res = model(input_ids=ids, attention_mask=mask, use_cache=False,
                                output_hidden_states=(ref == "residual"))
                resume = recorder.resume_at(layer)
            finally:
                hooks.remove(h2)
            kl_init = torch.log_softmax(res.logits[n_rw, kl_idx].float(), -1)
            x_in = captured["in"].view(len(seqs), ids.shape[1], -1)
            x_out = captured["out"].view(len(seqs), ids.shape[1], -1)
            keys = x_in[rows[:n_rw], pos[:n_rw]].float()
            if ref == "ff2_output":
                refv = x_out[0, idxs[0]].float()
            else:
                refv = res.hidden_states[layer + 1][0, idxs[0]].float()
        if through_u is not None:
            hooks.remove(handle)
            k_star = keys.mean(0)
            u = through_u(k_star).float().to(device)
            hook = _AddThrough(u, 1.0 / float(u @ lambda_key_vector(keys, lambda_key)))
            hooks.forward_hook(module, hook)
        delta = torch.zeros(refv.shape[0], device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norm = hp.clamp_norm_factor * refv.norm()
        losses: list[float] = []
        steps = 0
        # Each step re-runs only blocks `layer`.. (the earlier ones do not see δ: their output is
        # the recorded input of block `layer`) and the output head only where the loss reads it.
        at = [row.tolist() for row in tpos] + [[kl_idx]]
        last_is_loss_only = getattr(hp, "v_step_count", "n") == "n_minus_1"
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            hook.delta = delta
            with resume.batch(), head_only_at(model, tuple(ids.shape), at) as gather:
                picked = gather(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
            logp = torch.log_softmax(torch.stack(picked[:n_rw]), -1)  # [n_rw, len(target), vocab]
            tok_lp = logp.gather(-1, tgt[None, :, None].expand(n_rw, -1, 1))[..., 0]
            nll = -tok_lp.mean(1).mean()
            loss = v_loss(nll, kl_init, picked[n_rw][0], delta, refv, hp)
            losses.append(loss.item())
            if losses[-1] < hp.loss_stop:
                break
            if last_is_loss_only and it == hp.v_num_grad_steps - 1:
                break  # the reference loop: the n-th loss is computed, no n-th step is taken
            clamped_step(opt, delta, loss, max_norm)
            steps += 1
    finally:
        hooks.remove_all()
        for p in params:
            p.requires_grad_(True)
    return DeltaResult(delta.detach().float(), refv, keys, steps, losses)


def v_loss(nll: torch.Tensor, kl_init: torch.Tensor, kl_logits: torch.Tensor, delta: torch.Tensor,
           ref: torch.Tensor, hp: LocateEditHyperParams) -> torch.Tensor:
    """ROME's v* loss: the target's NLL + ``kl_factor`` · KL(edited || original) of the next token after
    ``"{subject} is a"`` (the paper's eq. (4); ``F.kl_div(input, target)`` = KL(target || input)) +
    ``v_weight_decay`` · ‖δ‖ / ‖ref‖²."""
    kl = hp.kl_factor * F.kl_div(kl_init, torch.log_softmax(kl_logits, -1), log_target=True, reduction="sum")
    return nll + kl + hp.v_weight_decay * delta.norm() / ref.norm() ** 2


def clamped_step(opt: torch.optim.Optimizer, delta: torch.Tensor, loss: torch.Tensor, max_norm: torch.Tensor) -> None:
    """One optimiser step on δ from ``loss``, then ‖δ‖ clamped to ``max_norm`` (ROME's v* loop)."""
    loss.backward()
    opt.step()
    with torch.no_grad():
        norm = delta.norm()
        if norm > max_norm:
            delta.mul_(max_norm / norm)


def canonical_weight(module: nn.Module) -> torch.Tensor:
    """FF2's weight as ``[out, in]`` float32 (a copy)."""
    return from_param_layout(module.weight.detach(), weight_layout(module)).float().clone()


def add_canonical_(module: nn.Module, update: torch.Tensor) -> None:
    """Add an ``[out, in]`` float update to the module's weight in place (temporary edits)."""
    layout = weight_layout(module)
    w = module.weight
    with torch.no_grad():
        upd = update if layout == "out_in" else update.T
        w.copy_((w.float() + upd.to(w.device, torch.float32)).to(w.dtype))


def request_info(skipped: list[bool], z_info: list[dict], layer_info: dict[int, dict]) -> list[dict]:
    """Per request: ``{}`` when skipped, else its ``z*`` details and the per-layer info."""
    it = iter(z_info)
    return [{} if s else {**next(it), "layers": layer_info} for s in skipped]


def target_zs(model: nn.Module, tok, adapter, z_layer: int, requests: list[EditRequest], templates: list[str],
              hparams: ZStarHyperParams) -> tuple[torch.Tensor, list[dict]]:
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
            hit = (
                (dr.ref + dr.delta).cpu(),
                {
                    "delta_norm": float(dr.delta.norm()),
                    "ref_norm": float(dr.ref.norm()),
                    "steps": dr.steps,
                    "loss_first": dr.losses[0],
                    "loss_last": dr.losses[-1],
                },
            )
            if entry:
                pt, meta_path, expected = entry
                write_verified(pt, meta_path, {"z": hit[0].contiguous()}, {**expected, "info": hit[1]})
        else:
            hit[1]["zstar_from_cache"] = True
        zs.append(hit[0])
        z_info.append(hit[1])
    return torch.stack(zs).double(), z_info


_ZSTAR_FORMAT = 2  # 2: tensor file plus verified metadata (io.write_verified)


#: hparams z* depends on (the layers only through the last one, z_layer); key_average does not change z*. An entry
#: written before context_length_mode / v_step_count existed has neither in its key, so it is never matched.
_ZSTAR_FIELDS = ("fact_token", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                 "loss_stop", "context_template_length_params", "context_seed", "context_length_mode", "v_step_count",
                 "ff1_templates", "ff2_template", "final_norm")


def _zstar_entry(fingerprint: str, device: str, z_layer: int, req: EditRequest, hparams: ZStarHyperParams
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


