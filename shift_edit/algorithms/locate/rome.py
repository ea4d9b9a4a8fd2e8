"""ROME: rank-one model editing (Meng et al., 2022, "Locating and Editing Factual
Associations in GPT"), written for this harness from the paper.

For one request at FF2 of layer ``l`` (the MLP output matrix, canonical ``W: [out, in]``):

1. Context templates: short texts sampled from the model itself (seeded, top-k 5) after
   the prefixes "The", "Therefore", "Because", "I", "You", each followed by ". " and the
   prompt. ``context_template_length_params: [[5, 10], [10, 10]]`` (the published ROME
   setting) means 10 generations of 5 new tokens and 10 of 10 new tokens, plus the bare
   prompt ``"{}"``: 21 contexts.
2. Key ``k*``: the FF2 input at the subject's last token (``fact_token``), averaged over
   the contexts.
3. ``u = C⁻¹ k*`` with ``C = E[k kᵀ]`` from :mod:`shift_edit.model.covariance` when
   ``mom2_adjustment`` is on (the default here, as in the paper; EasyEdit's shipped
   configs turn it off), else ``u = k*``.
4. ``v*``: a vector ``δ`` added to FF2's output at the subject position of every context
   is optimised with Adam for the target's NLL, plus ``kl_factor`` x KL(edited ||
   original) of the next-token distribution at the subject of ``"{subject} is a"``, plus
   ``v_weight_decay * ||δ|| / ||m||²`` (``m`` is FF2's original output there); after
   each step ``||δ||`` is clamped to ``clamp_norm_factor * ||m||``. ``v* = W k* + δ``.
5. ``ΔW = Λ uᵀ`` with ``Λ = (v* - W k*) / (uᵀ k*)``, so ``(W + ΔW) k* = v*`` and keys
   ``k`` with ``uᵀ k = 0`` are not changed. By default (``lambda_key: prompt``, as in ROME's
   reference code) the denominator is ``uᵀ k`` of the request's own (bare) prompt, whose FF2
   output then moves by exactly δ; ``lambda_key: mean`` uses the context-mean ``k*``.

Several requests are edited one after another (each computed against the model with
the earlier ones applied, as ROME's reference code does); the weights are restored
before returning and the rank-one factors are returned, summed per matrix.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...model.architectures import from_param_layout, weight_layout
from ...core.deltas import WeightDelta, put_back
from ...core.errors import ShiftEditError
from ...model.hooks import OwnedHooks
from ...core.registry import Computed, register
from ...core.requests import EditRequest, encode_target
from ...model.resume import BlockRecorder
from ...model.scoring import pad_batch, pad_id_of
from ...model.hooks import head_only_at
from ...model.covariance import SecondMoment, layer_stats
from ..common import EditHyperParams, adapter_for, already_predicted

log = logging.getLogger(__name__)

GEN_PREFIXES = ("The", "Therefore", "Because", "I", "You")


@dataclasses.dataclass(kw_only=True)
class LocateEditHyperParams(EditHyperParams):
    """Fields ROME and MEMIT share.

    Attributes:
        fact_token: where the key is read: ``subject_last`` (paper), ``subject_first`` or
            ``last`` (the prompt's last token).
        v_num_grad_steps / v_lr: Adam steps and learning rate for δ.
        v_weight_decay: weight of ``||δ|| / ||ref||²`` in the loss.
        clamp_norm_factor: ``||δ|| <= clamp_norm_factor * ||ref||``.
        kl_factor: weight of the KL term on ``"{subject} is a"``.
        loss_stop: stop early when the total loss falls below this.
        context_template_length_params: ``[[new_tokens, count], ...]`` of generated contexts.
        context_seed: seed of the context generation.
        mom2_corpus: text file or ``hf:<dataset>/<config>/<split>``; ``null`` = the default
            (local WikiText-2 test split when found, else WikiText-103 via ``datasets``).
        mom2_n_tokens: number of token vectors (non-padding tokens) in ``C``.
        mom2_max_length: truncation length of each corpus text.
        mom2_dtype: ``float32`` or ``float64`` accumulation.
    """

    fact_token: Literal["subject_last", "subject_first", "last"] = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    loss_stop: float = 5e-2
    context_template_length_params: list[list[int]] = dataclasses.field(
        default_factory=lambda: [[5, 10], [10, 10]]
    )
    context_seed: int = 0
    mom2_corpus: str | None = None
    mom2_n_tokens: int = 100_000
    mom2_max_length: int = 256
    mom2_dtype: Literal["float32", "float64"] = "float32"

    def validate(self) -> None:
        super().validate()
        if self.v_num_grad_steps < 1:
            self._fail("v_num_grad_steps", self.v_num_grad_steps, "it must be >= 1")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                self._fail(name, getattr(self, name), "it must be > 0")
        for name in ("v_weight_decay", "kl_factor", "loss_stop"):
            if getattr(self, name) < 0:
                self._fail(name, getattr(self, name), "it must be >= 0")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or pair[0] < 1 or pair[1] < 0:
                self._fail("context_template_length_params", self.context_template_length_params,
                           "use [[new_tokens >= 1, count >= 0], ...]")
        if self.mom2_n_tokens < 1 or self.mom2_max_length < 1:
            self._fail("mom2_n_tokens", self.mom2_n_tokens, "mom2_n_tokens and mom2_max_length must be >= 1")


@dataclasses.dataclass(kw_only=True)
class ROMEHyperParams(LocateEditHyperParams):
    """Hparams of ROME (one layer).

    Attributes:
        mom2_adjustment: ``u = C⁻¹ k*`` (on, as in the paper) or ``u = k*`` (off).
        optimise_through_update: off (the paper): δ is added to FF2's output at the fact
            token of every context. On: ``u`` is fixed first and δ is optimised with the
            rank-one update itself applied (FF2's output at any key ``k`` changes by
            ``δ · uᵀk / uᵀk*``), so every context, the bare prompt included, is trained on the
            change it will really get. Worth it when the bare prompt's key is far from the
            context average (SmolLM2 adds no BOS: a subject at the start of the prompt sits at
            position 0, whose keys are outliers).
        lambda_key: the key ``k`` in ``Λ = δ / (uᵀk)``: ``prompt`` (default, as ROME's reference
            code does: the key of the request's own prompt, which then gets exactly δ; every
            other context gets ``δ · uᵀk / uᵀk_prompt``) or ``mean`` (the paper's equation
            read with ``k*`` = the context mean: ``(W + ΔW) k* = W k* + δ``, the prompt itself
            gets ``δ · uᵀk_prompt / uᵀk*``). ``u`` comes from the context mean in both.
    """

    ALG_NAME = "ROME"

    mom2_adjustment: bool = True
    optimise_through_update: bool = False
    lambda_key: Literal["mean", "prompt"] = "prompt"

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            self._fail("layers", self.layers, "ROME edits exactly one layer")


# --- contexts and token positions -----------------------------------------------------------
_TEMPLATE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def context_templates(model: nn.Module, tok, length_params: Sequence[Sequence[int]], seed: int) -> list[str]:
    """``["{}", "<generated text>. {}", ...]``: contexts sampled from the model (top-k 5,
    seeded), cached per model object, lengths and seed."""
    per_model = _TEMPLATE_CACHE.setdefault(model, {})
    key = (tuple(tuple(p) for p in length_params), seed)
    if key in per_model:
        return per_model[key]
    device = next(model.parameters()).device
    out = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for new_tokens, count in length_params:
            per_prefix = [count // len(GEN_PREFIXES) + (1 if i < count % len(GEN_PREFIXES) else 0)
                          for i in range(len(GEN_PREFIXES))]
            for prefix, n in zip(GEN_PREFIXES, per_prefix):
                if n == 0:
                    continue
                ids = tok(prefix, return_tensors="pt").input_ids.to(device)
                gen = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                    top_p=1.0, temperature=1.0, max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens),
                    num_return_sequences=n, pad_token_id=pad_id_of(tok),
                )
                for row in gen:
                    text = tok.decode(row, skip_special_tokens=True)
                    text = text.replace("{", " ").replace("}", " ").strip()
                    out.append(text + ". {}")
    per_model[key] = out
    return out


def prompt_template(req: EditRequest) -> str:
    """The request's prompt with ``{}`` where the subject goes."""
    if "{}" in req.prompt:
        return req.prompt
    if not req.subject or req.subject not in req.prompt:
        raise ShiftEditError(f"ROME/MEMIT need the subject in the prompt (request {req.prompt!r})")
    i = req.prompt.index(req.subject)
    return req.prompt[:i] + "{}" + req.prompt[i + len(req.subject):]


def encode_with_fact_index(tok, template: str, subject: str, fact_token: str) -> tuple[list[int], int]:
    """Token ids of ``template.format(subject)`` and the index of the fact token."""
    text = template.replace("{}", subject, 1)
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    if fact_token == "last":
        return ids, len(ids) - 1
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise ShiftEditError("ROME/MEMIT need a fast tokenizer (offset mapping) to find the subject")
    start = template.index("{}")
    end = start + len(subject)
    real = [(i, a, b) for i, (a, b) in enumerate(offsets) if b > a]
    if fact_token == "subject_last":
        cands = [i for i, a, _b in real if a < end]
        return ids, cands[-1]
    cands = [i for i, _a, b in real if b > start]
    return ids, cands[0]


# --- forward passes with δ ------------------------------------------------------------------
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
        for _ in range(hp.v_num_grad_steps):
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
    return from_param_layout(module.weight.detach(), adapter_layout(module)).float().clone()


def adapter_layout(module: nn.Module):
    return weight_layout(module)


def add_canonical_(module: nn.Module, update: torch.Tensor) -> None:
    """Add an ``[out, in]`` float update to the module's weight in place (temporary edits)."""
    layout = adapter_layout(module)
    w = module.weight
    with torch.no_grad():
        upd = update if layout == "out_in" else update.T
        w.copy_((w.float() + upd.to(w.device, torch.float32)).to(w.dtype))


# --- ROME -----------------------------------------------------------------------------------
def rank_one_factors(
    delta: torch.Tensor, k_star: torch.Tensor, stats: SecondMoment | None, k_lambda: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's ``ΔW = Λ uᵀ`` as float32 factors ``(left [out, 1], right [1, in])``.

    ``u = C⁻¹ k*`` (``stats`` given) or ``k*`` (None), normalised; ``Λ = δ / (uᵀ k)`` with
    ``k = k_lambda`` (default ``k*``), so that ``ΔW k = δ`` and keys with ``uᵀ k = 0`` are
    unchanged.
    """
    k64 = k_star.double().cpu()
    u = update_direction(k64, stats)
    k_lam = k64 if k_lambda is None else k_lambda.double().cpu()
    lam = delta.double().cpu() / (u @ k_lam)
    return lam[:, None].float(), u[None, :].float()


def update_direction(k_star: torch.Tensor, stats: SecondMoment | None) -> torch.Tensor:
    """ROME's unit ``u`` in float64: ``C⁻¹ k*`` (or ``k*`` without statistics), normalised."""
    k64 = k_star.double().cpu()
    u = stats.solve(k64) if stats is not None else k64
    return u / u.norm()


def compute_rome(model: nn.Module, tok, requests: list[EditRequest], hparams: ROMEHyperParams) -> Computed:
    """Rank-one deltas of ROME, computed against ``model`` (weights restored on return)."""
    adapter = adapter_for(model, hparams)
    layer = adapter.check_layer(hparams.layers[0])
    name = adapter.ff2_name(layer)
    module = adapter.module(name)
    layout = adapter.layout(module)
    skipped = already_predicted(model, tok, requests) if hparams.skip_if_predicted else [False] * len(requests)
    if all(skipped):
        return Computed([], skipped, [{} for _ in requests])
    stats = None
    if hparams.mom2_adjustment:
        stats = layer_stats(model, tok, [layer], corpus=hparams.mom2_corpus, n_tokens=hparams.mom2_n_tokens,
                            max_length=hparams.mom2_max_length, dtype=hparams.mom2_dtype, adapter=adapter)[layer]
    templates = context_templates(model, tok, hparams.context_template_length_params, hparams.context_seed)
    orig = module.weight.detach().clone()
    deltas: list[WeightDelta] = []
    info: list[dict] = []
    try:
        for req, skip in zip(requests, skipped):
            if skip:
                info.append({})
                continue
            through = (lambda k: update_direction(k, stats)) if hparams.optimise_through_update else None
            dr = optimise_delta(model, tok, adapter, layer, req, templates, hparams, ref="ff2_output",
                                through_u=through, lambda_key=hparams.lambda_key)
            left, right = rank_one_factors(dr.delta, dr.keys.mean(0), stats,
                                           lambda_key_vector(dr.keys, hparams.lambda_key))
            deltas.append(WeightDelta(name, layout, left=left, right=right, layer=layer))
            add_canonical_(module, left @ right)
            info.append({
                "layer": layer,
                "delta_norm": float(dr.delta.norm()),
                "ref_norm": float(dr.ref.norm()),
                "steps": dr.steps,
                "loss_first": dr.losses[0],
                "loss_last": dr.losses[-1],
                "n_contexts": len(templates),
                # share of δ the bare prompt gets with Λ from the context mean: uᵀk_prompt / uᵀk*
                "prompt_key_share": float((right[0].double() @ dr.bare_key.double().cpu())
                                          / (right[0].double() @ dr.keys.mean(0).double().cpu())),
            })
    finally:
        put_back([(module.weight, orig)])
    return Computed(WeightDelta.merge(deltas), skipped, info)


register("ROME", ROMEHyperParams, compute_rome,
         "rank-one model editing (Meng et al. 2022): covariance-adjusted rank-one FF2 update, v* by optimisation")
