"""SHIFT_PLUS: the forward pass shift with a closed-form, locality-preserving key.

No optimiser loop and no backward pass: one batched forward pass, a small linear solve
against cached statistics, and a few batched *partial* forward passes to size the push.

For one request with target tokens ``t_0..t_{m-1}`` (teacher forcing):

1. **One batched forward pass** over the prompt, the prompt behind a few fixed context
   prefixes (``n_prefixes``), and the same template filled with other subjects
   (``n_contrast``, contrastive prompts). It records the keys ``k`` (inputs of FF2 at layer
   ``L``) at every target position, block ``L``'s input for the step search, and the logits
   (skip check; the final norm's input for ``value: norm``).
2. **Values**: one unit direction ``v_j`` in the residual stream per target token: the
   decoding row ``D[t_j]`` (``decoding``), centred (``centered``), minus the true object's row
   (``contrast``, first token only), or pulled back through the final norm (``norm``).
3. **Closed form.** With ``A = C + w_c Σ k_c k_cᵀ + w_m Σ k_mem k_memᵀ`` (``C = E[k kᵀ]`` of
   generic text from :mod:`shift_edit.model.covariance`, ``k_c`` the contrastive keys, ``k_mem`` keys of
   earlier edits from the :class:`~shift_edit.core.memory.EditMemory`) and ``K_e`` the edit keys
   (one column per target position and prompt variant), the unit update
   ``ΔW₁ = V (K_eᵀ A⁻¹ K_e)⁻¹ (A⁻¹ K_e)ᵀ`` writes ``v_j`` at the edit keys exactly while
   minimising ``tr(ΔW A ΔWᵀ)`` — the expected disturbance of generic text plus the change at
   the preserved keys. It is rank ``m`` (one per target token).
4. **Several layers** (``layers: [L_1, .., L_n]``): the same closed form at each layer's FF2, each against
   its own statistics and memory, and each layer writes ``1/n`` of the push (MEMIT's spreading, without
   z*): ``n`` rank-``m`` changes whose summed disturbance of generic text is about ``n`` times smaller
   than one layer's (``Σ (s/n)² / kᵀC⁻¹k``; see ``eval/shift_plus/disturbance.py``). Measured on SmolLM2
   (``eval/reports/shift_plus/``): no gain for single edits, and sequential edits fail, because an edit
   at a lower layer moves the upper layers' keys of every later prompt.
5. **Step size**: ``ΔW = s ΔW₁``. Blocks ``L..`` are re-run from the recorded input of block
   ``L`` with ``s ΔW₁`` added to FF2's output (exactly the edited model), for a batch of
   candidate ``s`` at once (``search_passes`` passes: a geometric grid, then a finer grid
   inside the bracket). The smallest ``s`` that gives every target token a logit margin of
   ``margin`` over the runner-up (on the prompt, or on every variant) is scaled by
   ``overshoot`` and capped at ``max_push``.

Forward passes per edit (calls of the model): ``1 + search_passes`` (``1`` when the target is
already predicted and ``skip_if_predicted`` is on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ...core.deltas import WeightDelta
from ...core.guard import PromptInputs
from ...core.memory import EditMemory
from ...core.registry import Computed, register, tag_layers, tag_statistics, tag_value
from ...core.requests import EditRequest, encode_target
from ...model.covariance import layer_stats
from ...model.hooks import capture_inputs, head_only_at, owned_hooks
from ...model.resume import record_block_inputs, resume_at
from ...model.scoring import pad_batch, pad_id_of
from ..common import EditHyperParams, adapter_for
from .push import build_batch, margins, search_push, validate_batch_and_search


@dataclasses.dataclass(kw_only=True)
class ShiftPlusHyperParams(EditHyperParams):
    """Hparams of SHIFT_PLUS (one edited layer, or several sharing the push).

    Attributes:
        layers: the edited FF2 layers; several share the push equally (see the module docstring).
        value: the pushed direction: ``decoding`` (D[t]), ``centered`` (D[t] minus the mean row),
            ``contrast`` (D[t] - D[t_true] for the first token), ``norm`` (D[t] through the final
            norm's Jacobian at the prompt's final hidden state).
        target_tokens: ``all`` (one push per target token at its own position) or ``first``.
        n_contrast: how many other subjects fill the template for the contrastive keys (0: none).
        contrast_weight: weight of each contrastive key in ``A``, in units of generic-text tokens.
        n_prefixes: context prefixes whose keys are also edit keys (0: the bare prompt only).
        key_pooling: ``stack`` (every variant's key is a constraint) or ``mean`` (their mean).
        whiten: use ``C`` from the statistics (``False``: the identity scaled to ``C``'s trace).
        memory_weight: weight of each earlier edit's key in ``A`` (lifelong editing).
        ridge: relative ridge on ``K_eᵀ A⁻¹ K_e`` (variants' keys are nearly collinear).
        margin: logit margin of every target token over the runner-up that the push aims at.
        margin_on: ``prompt`` (the request's own prompt) or ``all`` (every prefix variant too).
        overshoot: factor on the smallest push that reaches the margin.
        max_push: cap on the push ``s`` (residual-stream norm units).
        search_passes: batched partial forward passes of the step search (>= 1).
        search_points: candidate pushes per search pass.
        mom2_*: the statistics (as ROME's; the same cache).
    """

    ALG_NAME = "SHIFT_PLUS"

    value: Literal["decoding", "centered", "contrast", "norm"] = "decoding"
    target_tokens: Literal["first", "all"] = "all"
    n_contrast: int = 16
    contrast_weight: float = 1000.0
    n_prefixes: int = 4
    key_pooling: Literal["stack", "mean"] = "stack"
    whiten: bool = True
    memory_weight: float = 10000.0
    ridge: float = 0.01
    margin: float = 2.0
    margin_on: Literal["prompt", "all"] = "prompt"
    overshoot: float = 1.0
    max_push: float = 400.0
    search_passes: int = 2
    search_points: int = 12
    mom2_corpus: str | None = None
    mom2_n_tokens: int = 200_000
    mom2_max_length: int = 128
    mom2_dtype: Literal["float32", "float64"] = "float32"

    def validate(self) -> None:
        super().validate()
        self._require_finite("contrast_weight", "memory_weight", "ridge")
        self._require_finite("overshoot", "max_push", positive=True)
        validate_batch_and_search(self)

    @property
    def forward_passes(self) -> int:
        """Model calls per edited (not skipped) request."""
        return 1 + self.search_passes


# --- the preserved-key metric A and its inverse ---------------------------------------------------
#: C⁻¹ per model object, then per (parameter, statistics settings): read once per process, so later calls
#: neither fingerprint the (possibly edited) model nor reload the statistics (weakly keyed: a new model
#: object never sees another's statistics, even one that reuses a freed model's id)
_C_INV: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()
#: B⁻¹ = (C + w_m K_mem K_memᵀ)⁻¹ per memory object and model, updated (Woodbury) as the memory grows
_MEM_INV: "weakref.WeakKeyDictionary[EditMemory, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def _c_inverse(model, tok, adapter, layer: int, param: str, d: int, hp: ShiftPlusHyperParams) -> torch.Tensor:
    """``C⁻¹`` (float64; ``C`` with a tiny relative ridge), or the identity when ``whiten`` is off.

    The statistics are those of the model as first seen in this process (later calls on an
    edited model reuse them)."""
    cache = _C_INV.setdefault(model, {})
    key = (param, hp.whiten, hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_max_length, hp.mom2_dtype)
    if key not in cache:
        if hp.whiten:
            c = layer_stats(model, tok, [layer], corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens,
                            max_length=hp.mom2_max_length, dtype=hp.mom2_dtype, adapter=adapter,
                            progress=False)[layer].mom2.double()
            c = c + 1e-6 * float(torch.diagonal(c).mean()) * torch.eye(c.shape[0], dtype=torch.float64)
            cache[key] = torch.linalg.inv(c)
        else:
            cache[key] = torch.eye(d, dtype=torch.float64)
    return cache[key]


def _base_inverse(model, tok, adapter, layer: int, param: str, d: int, hp: ShiftPlusHyperParams,
                  memory: EditMemory | None, extra: torch.Tensor | None) -> torch.Tensor:
    """``(C + w_m Σ k kᵀ)⁻¹`` (float64) over the memory's keys and ``extra`` (earlier requests of
    this call); the memory part is cached per memory object and updated as it grows."""
    inv = _c_inverse(model, tok, adapter, layer, param, d, hp)
    mem = memory.keys(param) if memory is not None else None
    if mem is not None and len(mem) and hp.memory_weight > 0:
        slot = _MEM_INV.setdefault(memory, weakref.WeakKeyDictionary()).setdefault(model, {})
        key = (param, hp.whiten, hp.memory_weight, hp.mom2_corpus, hp.mom2_n_tokens,
               hp.mom2_max_length, hp.mom2_dtype)
        entry = slot.get(key)
        n_mem = int(mem.shape[0])
        if entry is not None and entry["n"] <= n_mem and torch.equal(mem[entry["n"] - 1], entry["last"]):
            base, new = entry["inv"], mem[entry["n"]:]
        else:
            base, new = inv, mem
        inv = _woodbury(base, new.double().T, hp.memory_weight) if len(new) else base
        slot[key] = {"n": n_mem, "inv": inv, "last": mem[-1].clone()}
    if extra is not None and len(extra) and hp.memory_weight > 0:
        inv = _woodbury(inv, extra.double().T, hp.memory_weight)
    return inv


def _woodbury(inv: torch.Tensor, k: torch.Tensor, w: float) -> torch.Tensor:
    """``(B + w k kᵀ)⁻¹`` from ``B⁻¹`` and keys ``k`` ``[d, n]`` (float64)."""
    bk = inv @ k
    small = torch.eye(k.shape[1], dtype=inv.dtype) / w + k.T @ bk
    out = inv - bk @ torch.linalg.solve(small, bk.T)
    return (out + out.T) / 2


def unit_update(a_inv: torch.Tensor, k_e: torch.Tensor, values: torch.Tensor,
                k_c: torch.Tensor | None, w_c: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed form ``ΔW₁ = V (K_eᵀ A⁻¹ K_e + ρ)⁻¹ (A⁻¹ K_e)ᵀ`` as factors ``(V, U)``.

    Args:
        a_inv: ``B⁻¹`` ``[d, d]`` (float64); contrastive keys are added to ``B`` here (Woodbury).
        k_e: edit keys ``[n_e, d]``; values: their residual pushes ``[n_e, d_out]``.
        k_c: contrastive keys ``[n_c, d]`` or None; w_c: their weight.
        ridge: relative ridge on ``K_eᵀ A⁻¹ K_e``.

    Returns:
        ``(left [d_out, n_e], right [n_e, d])``: ``ΔW₁ = left @ right``.
    """
    ke = k_e.double().T  # [d, n_e]
    aik = a_inv @ ke
    if k_c is not None and len(k_c) and w_c > 0:
        kc = k_c.double().T
        bkc = a_inv @ kc
        small = torch.eye(kc.shape[1], dtype=torch.float64) / w_c + kc.T @ bkc
        aik = aik - bkc @ torch.linalg.solve(small, bkc.T @ ke)
    gram = ke.T @ aik
    gram = gram + ridge * float(torch.diagonal(gram).mean()) * torch.eye(gram.shape[0], dtype=torch.float64)
    right = torch.linalg.solve(gram, aik.T)  # [n_e, d]
    return values.double().T, right


def _directions(adapter, hp: ShiftPlusHyperParams, tok, req: EditRequest, target: list[int], n_tok: int,
                final_h: torch.Tensor) -> torch.Tensor:
    """Unit value directions ``[n_tok, d_model]`` (float64)."""
    dmat = adapter.decoding_matrix().detach()
    rows = dmat[target[:n_tok]].double()
    if hp.value == "centered":
        rows = rows - dmat.double().mean(0)
    elif hp.value == "contrast" and req.target_true:
        true_ids = encode_target(tok, req.text, req.target_true)
        rows[0] = rows[0] - dmat[true_ids[0]].double()
    elif hp.value == "norm":
        norm = adapter.final_norm()
        g = getattr(norm, "weight", None)
        g = torch.ones(rows.shape[1], dtype=torch.float64) if g is None else g.detach().double().cpu()
        rows = rows * g
        h = final_h.double()
        if isinstance(norm, nn.LayerNorm):
            rows = rows - rows.mean(-1, keepdim=True)
            h = h - h.mean(-1, keepdim=True)
        hn = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        rows = rows - (rows * hn).sum(-1, keepdim=True) * hn
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@contextlib.contextmanager
def _added_output(module: nn.Module, left: torch.Tensor, right: torch.Tensor, scales: torch.Tensor):
    """FF2 outputs ``+ s_row · x ΔW₁ᵀ`` for each batch row (``scales`` ``[batch]``)."""

    def hook(_module, args, output):
        x = args[0]
        if x.dim() == 2:  # OPT flattens [batch, seq, d] inside its MLP
            x = x.view(scales.numel(), -1, x.shape[-1])
        add = (x.to(right.dtype) @ right.T) @ left.T  # [batch, seq, d_out]
        add = scales.view(-1, *([1] * (add.dim() - 1))) * add
        return output + add.reshape(output.shape).to(output.dtype)

    with owned_hooks() as hooks:
        hooks.forward_hook(module, hook)
        yield


@dataclasses.dataclass
class _Site:
    """One edited FF2: its layer, module path, parameter name, module and weight layout."""
    layer: int
    name: str
    param: str
    module: nn.Module
    layout: object


@contextlib.contextmanager
def _added_outputs(sites: list[_Site], factors: list[tuple[torch.Tensor, torch.Tensor]], scales: torch.Tensor):
    """:func:`_added_output` at every site at once (each with its own factors, the same scales)."""
    with contextlib.ExitStack() as stack:
        for site, (left, right) in zip(sites, factors):
            stack.enter_context(_added_output(site.module, left, right, scales))
        yield


# length: the per-request loop (one batched pass, closed form per layer, batched push search) carries the layers'
#   inverses and the memory keys across requests; its steps are helpers already (unit_update, build_batch,
#   search_push)
@torch.no_grad()
def compute_shift_plus(model: nn.Module, tok, requests: list[EditRequest], hparams: ShiftPlusHyperParams,
                       *, memory: EditMemory | None = None) -> Computed:
    """Deltas of SHIFT_PLUS, computed against ``model`` as it is (not modified)."""
    hp = hparams
    adapter = adapter_for(model, hp)
    sites = []
    for layer in sorted(adapter.check_layer(x) for x in hp.layers):
        name = adapter.ff2_name(layer)
        module = adapter.module(name)
        sites.append(_Site(layer, name, adapter.param_name(name), module, adapter.layout(module)))
    first = sites[0].layer
    share = 1.0 / len(sites)  # each layer writes this part of the push
    device = next(model.parameters()).device
    pad = pad_id_of(tok)
    norm_name = adapter.final_norm_path if hp.value == "norm" else None

    deltas: list[WeightDelta] = []
    skipped: list[bool] = []
    info: list[dict] = []
    new_keys: dict[str, list[torch.Tensor]] = {site.param: [] for site in sites}
    kept = PromptInputs(adapter)  # the guard's pass over the prompt starts at the first edited block
    for req in requests:
        target = encode_target(tok, req.text, req.target_new)
        n_tok = len(target) if hp.target_tokens == "all" else 1
        batch = build_batch(tok, req, target, n_prefixes=hp.n_prefixes, n_contrast=hp.n_contrast,
                            all_tokens=hp.target_tokens == "all")
        ids, mask = pad_batch(batch.seqs, pad, device)
        names = [site.name for site in sites] + ([norm_name] if norm_name else [])
        pos0 = batch.positions[0][0]
        head_at = [list(range(pos0, pos0 + len(target)))] + [[]] * (len(batch.seqs) - 1)  # the prompt's only
        with record_block_inputs(adapter) as blocks_in, capture_inputs(model, names) as cap, \
                head_only_at(model, tuple(ids.shape), head_at) as gather:
            logits = gather(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)[0]
        block_in = blocks_in[first]
        kept.add(first, req.text, block_in[0, : pos0 + 1])
        pred = logits.argmax(-1).cpu()
        if hp.skip_if_predicted and bool((pred == torch.tensor(target)).all()):
            skipped.append(True)
            info.append({"target_ids": target, "forward_passes": 1})
            continue
        skipped.append(False)
        final_h = cap.inputs[norm_name][0, batch.positions[0]].cpu() if norm_name else None
        dirs = _directions(adapter, hp, tok, req, target, n_tok, final_h)  # [n_tok, d_out]
        factors, site_keys = [], []
        for site in sites:
            # [rows, seq, d_in] (OPT flattens its MLP input)
            keys = cap.inputs[site.name].float().cpu().reshape(ids.shape[0], ids.shape[1], -1)
            ke_all = torch.stack([keys[r, batch.positions[r]] for r in range(batch.n_variants)])  # [V, n_tok, d]
            if hp.key_pooling == "mean":
                k_e, n_rep = ke_all.mean(0), 1
            else:
                k_e, n_rep = ke_all.reshape(-1, ke_all.shape[-1]), batch.n_variants  # variant-major
            kc_rows = range(batch.n_variants, len(batch.seqs))
            k_c = torch.cat([keys[r, batch.positions[r]] for r in kc_rows]) if len(kc_rows) else None
            extra = torch.cat(new_keys[site.param]) if new_keys[site.param] else None
            a_inv = _base_inverse(model, tok, adapter, site.layer, site.param, int(keys.shape[-1]), hp, memory, extra)
            _, right = unit_update(a_inv, k_e, dirs.repeat(n_rep, 1), k_c, hp.contrast_weight, hp.ridge)
            # the variants' columns share their value: sum their key rows, so the factors are rank n_tok
            factors.append((dirs.T.contiguous() * share, right.view(n_rep, n_tok, -1).sum(0)))
            site_keys.append(ke_all[0])  # the bare prompt's keys, one per target position
        factors_dev = [(left.to(device, torch.float32), right.to(device, torch.float32)) for left, right in factors]

        # step search: re-run blocks L_1.. for candidate pushes (the variants only)
        v = batch.n_variants
        check_rows = [0] if hp.margin_on == "prompt" else list(range(v))

        def reaches(grid: torch.Tensor) -> torch.Tensor:
            scales = grid.to(torch.float32)
            n_s = len(scales)
            hidden = block_in[:v].repeat(n_s, 1, 1)
            row_scales = scales.repeat_interleave(v).to(device)
            at = [batch.positions[r % v] for r in range(n_s * v)]  # the head runs at the target positions only
            with resume_at(adapter, first, hidden), _added_outputs(sites, factors_dev, row_scales), \
                    head_only_at(model, (n_s * v, ids.shape[1]), at) as gather:
                lg = torch.stack(gather(model(input_ids=ids[:v].repeat(n_s, 1), attention_mask=mask[:v].repeat(n_s, 1),
                                              use_cache=False).logits))  # [rows, n_tok, vocab]
            rows = [j * v + r for j in range(n_s) for r in check_rows]
            marg = margins(lg, [list(range(n_tok))], target[:n_tok], rows)
            return marg.view(n_s, len(check_rows)).min(-1).values >= hp.margin

        hi, search = search_push(reaches, hp.max_push, hp.search_points, hp.search_passes)
        passes = 1 + search
        push = hp.max_push if hi is None else min(hp.overshoot * hi, hp.max_push)
        for site, (left, right), keys in zip(sites, factors, site_keys):
            deltas.append(WeightDelta(site.name, site.layout, left=(left * push).float().cpu(),
                                      right=right.float().cpu(), layer=site.layer))
            new_keys[site.param].append(keys)
        info.append({"target_ids": target, "push": push, "reached_margin": hi is not None,
                     "forward_passes": passes, "n_edit_keys": int(k_e.shape[0]),
                     "n_contrast_keys": 0 if k_c is None else int(k_c.shape[0]), "layers": [x.layer for x in sites]})
    mem_out = {param: torch.cat(k) for param, k in new_keys.items() if k}
    return Computed(WeightDelta.merge(deltas), skipped, info, memory_keys=mem_out, prompt_inputs=kept)


def describe_shift_plus(hp: Mapping[str, Any]) -> list[str]:
    """Run tags: the layers, the statistics and the logit margin the push aims at."""
    return tag_layers(hp) + tag_statistics(hp) + tag_value(hp, "margin")


register("SHIFT_PLUS", ShiftPlusHyperParams, compute_shift_plus,
         "forward pass shift with a closed-form key (statistics, contrastive and earlier-edit keys "
         "preserved) and a push sized by batched partial forward passes; no backward pass",
         uses_memory=True, describe=describe_shift_plus)
