"""SHIFT_SUBJECT: a fact written into one FF neuron keyed on the subject, so that paraphrases reach it.

SHIFT_NEURON keys its neuron on the last prompt token: the neuron fires on that wording only (a prompt
cache). SHIFT_SUBJECT keys it where ROME reads its key: the subject's last token, in a middle layer. A
causal model's representation there depends on the subject and the text before it, never on the wording of
the relation after it, so a paraphrase produces nearly the same key and fires the same neuron; the neuron's
value is a residual-stream vector that attention carries from the subject to the prompt's end.

For a request at layer ``L`` (one neuron per request, whatever the target's length):

1. **Keys** (:func:`~shift_edit.algorithms.shift.subject_value.prepare`): the MLP input ``h`` at the subject's fact
   token
   (``fact_token``, ROME's ``subject_last``) of the prompt behind ROME's context templates (``"{}"`` and a few short
   texts the model generated, ``context_template_length_params``), at every listed layer, and the unedited logits
   (skip check); then the template filled with other subjects (``n_contrast``; a pass that stops at the highest
   listed layer).
2. **Gate** (SHIFT_NEURON's closed form, :func:`~shift_edit.algorithms.shift.shift_neuron.gate_key`): a key ``g`` with
   ``gᵀ(h_c - μ) = 1`` at every context ``c`` and least variance on generic text, on the other subjects and on
   earlier edits' subject keys (the :class:`~shift_edit.core.memory.EditMemory`), so the neuron's pre-activation is
   ``α(1 - β)`` at the subject in every context and ``-αβ ± spread`` elsewhere, where the activation function gives
   about 0. ``max_generic_fires`` refuses a neuron that would fire on too many tokens of a generic sample.
3. **Value** (:func:`~shift_edit.algorithms.shift.subject_value.fit_value`): δ added to FF2's output at the fact token
   of
   every context, fitted by ``v_num_grad_steps`` Adam steps on ROME's v* loss (target NLL, KL on
   ``"{subject} is a"``, weight decay, norm clamp). Each step re-runs blocks ``L..`` on the columns from the fact
   token on only (a KV cache holds the text before it): one forward and one backward pass over a few tokens.
4. **Neuron**: the layer's cheapest free neuron (SHIFT_NEURON's choice) gets FF1 row(s) from the gate and the FF2
   column ``δ / a`` (``a``: its activation at the subject, ``activation`` for gated MLPs). One more forward pass
   with the neuron in place (hooks; weights untouched) checks the request's strict top-1 (``info["top1"]``) and
   records the edited model's MLP inputs at the subject, the keys later edits keep their neurons silent on.

Several ``layers``: a request goes to the first listed layer with room (``neurons_per_layer``, counted in the
memory), and ``try_layers`` lets a refused request (generic screen, or not top-1 with ``if_unreached: skip``) try
the next ones with the same keys.

Model calls per edited request at its first layer (:attr:`ShiftSubjectHyperParams.passes`, ``info`` counts them):
forward: the prefix pass of the cache, the keys pass, the contrast pass, ``v_num_grad_steps`` steps over blocks
``L..``, the check (``4 + steps``; ``3 + steps`` on a model whose cached prefixes failed their one-time check);
backward: ``v_num_grad_steps``. A skipped request costs 2 forward passes. Each further layer tried adds ``steps + 1``
forward and ``steps`` backward passes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ...core.deltas import WeightDelta
from ...core.errors import ShiftEditError
from ...core.memory import EditMemory
from ...core.registry import Computed, register, tag_layers, tag_statistics
from ...core.requests import EditRequest, encode_target
from ...model.architectures import weight_layout
from ...model.hooks import capture_inputs, owned_hooks
from ...model.low_precision import low_precision_copy
from ...model.scoring import pad_batch, pad_id_of
from ..common import adapter_for
from ..locate.contexts import context_templates, encode_with_fact_index, prompt_template
from ..locate.locate_hparams import LocateEditHyperParams
from .neurons import (
    DecodingUnits,
    Gate,
    GenericView,
    Mlp,
    Neuron,
    NeuronFields,
    SilentPool,
    canonical,
    decoding_units,
    earlier_keys,
    ff1_hooks,
    fires_on,
    free_neurons,
    gate_bias,
    generic_keys,
    generic_stats,
    memory_used,
    mlp_of,
    neuron_rows,
    neuron_tags,
    one_hot,
    prime_generic_stats,
    validate_neuron_fields,
)
from .push import CONTRAST_SUBJECTS
from .subject_value import fit_value, prepare

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class ShiftSubjectHyperParams(NeuronFields, LocateEditHyperParams):
    """Hparams of SHIFT_SUBJECT.

    Attributes:
        layers: the layers whose neurons may be rewritten (filled in this order, ``neurons_per_layer`` each).
        neurons_per_layer: how many neurons of a layer may be rewritten before the next listed layer is used.
        try_layers: how many of the listed layers with room a request may try when refused at one.
        threshold / sharpness / activation / ridge: the gate (as SHIFT_NEURON's): generic mean at ``-β`` on the
            key's scale, the subject at ``1 - β``; FF1 row ``α g``; activation ``activation`` at the subject
            (gated MLPs); relative ridge on the generic covariance.
        n_contrast / contrast_weight: other subjects that fill the template; the neuron is kept silent on them
            (weight in units of generic tokens).
        memory_weight: weight of each earlier edit's subject key (kept silent too).
        negatives / negative_weight / negative_reach / max_generic_fires: the generic sample (as SHIFT_NEURON's).
        if_unreached: ``apply`` or ``skip`` a request whose prompt is not strict top-1 with the neuron in place.
        v_retry_steps: when the prompt is not strict top-1 with the neuron in place, fit the value once more from
            the start with ``v_num_grad_steps + v_retry_steps`` steps and check again (0: never). Requests that
            pass the first check are computed exactly as without it.
        v_contexts_per_step: each step of the value's fit runs the bare prompt, this many of the generated contexts
            (in turn, so that every context is seen every few steps) and the KL row, instead of every row: a step
            costs about ``(v_contexts_per_step + 2) / (n_contexts + 1)`` of a full one's tokens. None: every row.
        v_dtype: fit the value on a copy of the model in this dtype (``bfloat16``; None: on the model itself): the
            rows' passes and the steps run there, about twice as fast on a CPU, whose passes over a few tokens are
            bound by reading the weights; the keys, the gate and the check stay at the model's precision. The copy
            is made once and held while the model lives (:mod:`~shift_edit.model.low_precision`).
        v_start_scales: start the fit along the VJP instead of at 0: one forward and backward pass give the
            gradient of the contexts' NLL at δ = 0, one batched forward pass tries ``s · max_norm`` along it for
            each listed ``s`` (``max_norm = clamp_norm_factor · ‖FF2 output‖``) and keeps the best (v* loss).
            None: start at 0.
        fact_token / v_* / clamp_norm_factor / kl_factor / loss_stop / context_*: the value's optimisation and its
            contexts (ROME's fields and meaning; ``fact_token`` must be a subject token).
        mom2_*: the MLP-input statistics (SHIFT_NEURON's cache, ``site="ff1"``).
    """

    ALG_NAME = "SHIFT_SUBJECT"

    neurons_per_layer: int = 400
    threshold: float = 0.5
    if_unreached: Literal["apply", "skip"] = "apply"
    v_retry_steps: int = 0
    v_contexts_per_step: int | None = None
    v_start_scales: list[float] | None = None
    v_dtype: Literal["bfloat16", "float16"] | None = None
    v_num_grad_steps: int = 8
    v_lr: float = 2.0
    context_template_length_params: list[list[int]] = dataclasses.field(default_factory=lambda: [[5, 5]])
    mom2_n_tokens: int = 50_000
    mom2_max_length: int = 128

    def validate(self) -> None:
        super().validate()
        if self.fact_token == "last":
            self._fail("fact_token", self.fact_token, "use subject_last or subject_first (SHIFT_NEURON keys on the "
                                                      "last token)")
        validate_neuron_fields(self)
        if self.n_contrast < 0:
            self._fail("n_contrast", self.n_contrast, "it must be >= 0")
        if self.v_contexts_per_step is not None and self.v_contexts_per_step < 1:
            self._fail("v_contexts_per_step", self.v_contexts_per_step, "it must be >= 1 (or null: every context)")
        if self.v_start_scales is not None and (not self.v_start_scales or not all(
                math.isfinite(x) and 0 < x <= 1 for x in self.v_start_scales)):
            self._fail("v_start_scales", self.v_start_scales, "it must list scales in (0, 1] (or be null)")
        if self.v_retry_steps < 0:
            self._fail("v_retry_steps", self.v_retry_steps, "it must be >= 0")

    @property
    def passes(self) -> dict[str, int]:
        """Model calls per edited request at its first layer when the first check passes: forward passes (the
        cache's prefix pass, the keys pass, the contrast pass, the value's steps, the check) and backward passes
        (the value's steps), plus 2 forward and 1 backward pass for ``v_start_scales`` and, with ``v_dtype``, the
        keys pass at full precision that stops after the highest listed layer (the prefix, rows and steps then run
        on the low-precision copy). A retry (``v_retry_steps``)
        adds ``v_num_grad_steps + v_retry_steps + 1`` forward and ``v_num_grad_steps + v_retry_steps`` backward
        passes (and the start's again)."""
        start = 1 if self.v_start_scales else 0
        low = 1 if self.v_dtype else 0
        return {"forward": 4 + low + 2 * start + self.v_num_grad_steps, "backward": start + self.v_num_grad_steps}


@torch.no_grad()
def _contrast_keys(model: nn.Module, tok, req: EditRequest, in_names: Sequence[str], top: str,
                   hp: ShiftSubjectHyperParams) -> dict[str, torch.Tensor]:
    """MLP inputs (float64 ``[n_contrast, d]`` per FF1 name) at the fact token of the template filled with other
    subjects; the pass stops after ``top`` (the highest listed layer's FF1)."""
    ptmpl, subject = prompt_template(req), req.subject or ""
    others = [s for s in CONTRAST_SUBJECTS if s.lower() != subject.lower()][: hp.n_contrast]
    if not others:
        return {}
    seqs, idxs = zip(*(encode_with_fact_index(tok, ptmpl, other, hp.fact_token) for other in others))
    ids, mask = pad_batch(list(seqs), pad_id_of(tok), next(model.parameters()).device)
    with capture_inputs(model, list(in_names), stop_after=top) as cap:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    rows, pos = torch.arange(len(seqs)), torch.tensor(idxs)
    return {name: x.reshape(len(seqs), ids.shape[1], -1)[rows, pos].double().cpu() for name, x in cap.inputs.items()}


def _design(h_e: torch.Tensor, silent: torch.Tensor | None, j: int, mlp: Mlp, gen: GenericView,
            pool: SilentPool | None, hp: ShiftSubjectHyperParams) -> tuple[list[torch.Tensor], Gate]:
    """Neuron ``j``'s new FF1 row(s): firing at every context's subject key ``h_e``, silent on the other subjects'
    keys ``silent``, generic text and, via ``pool``, earlier edits' keys it would nearly fire on."""
    silent = silent if silent is not None else h_e[:0]
    weights = torch.full((len(silent),), hp.contrast_weight, dtype=torch.float64)
    return neuron_rows(mlp, gen, h_e, silent, weights, gate_bias(mlp, j), pool, hp)


def _check(model: nn.Module, tok, req: EditRequest, target: list[int], mlp: Mlp, neuron: Neuron,
           delta: torch.Tensor, fact: int, in_names: dict[int, str]
           ) -> tuple[bool, float, dict[str, torch.Tensor]]:
    """One forward pass of the bare prompt (teacher-forced) with the neuron in place (FF1 rows by hooks, FF2 column
    ``delta / a`` with ``a`` its activation at the subject): strict top-1 of the target, ``a``, and the MLP inputs
    of every listed layer at the subject token as the edited model computes them."""
    ids_list, _idx = encode_with_fact_index(tok, prompt_template(req), req.subject or "", "last")
    n = len(ids_list)
    seq = ids_list + target[:-1]
    device = next(model.parameters()).device
    ids = torch.tensor([seq], device=device)
    fired: dict[str, float] = {}

    def ff2_hook(_m, args, out):
        x = args[0]
        a = x.reshape(-1, x.shape[-1])[:, neuron.j].float()  # [seq]
        fired["a"] = float(a[fact])
        col = delta.to(x.device) / max(fired["a"], 1e-6)
        add = a[:, None] * (col - neuron.old_col.to(x.device))[None]
        return out + add.reshape(out.shape).to(out.dtype)

    with owned_hooks() as hooks, capture_inputs(model, list(in_names.values())) as cap:
        ff1_hooks(hooks, mlp, [neuron])
        hooks.forward_hook(mlp.ff2, ff2_hook)
        logits = model(input_ids=ids, use_cache=False).logits
    pred = logits[0, n - 1: n - 1 + len(target)].argmax(-1).cpu()
    after = {name: x.reshape(1, len(seq), -1)[0, fact].float().cpu()[None] for name, x in cap.inputs.items()}
    return bool((pred == torch.tensor(target)).all()), fired.get("a", 0.0), after


def _deltas(mlp: Mlp, layer: int, j: int, rows: list[torch.Tensor], col: torch.Tensor, act: float,
            hp: ShiftSubjectHyperParams) -> list[WeightDelta]:
    """Rank-one deltas writing neuron ``j``: FF1 row(s) (the up row scaled to ``activation`` at the subject) and
    FF2 column ``col`` (the value per unit of activation)."""
    out = []
    rows = list(rows)
    final = act
    if mlp.kind != "plain":
        rows[1] = rows[1] * (hp.activation / act)
        final = hp.activation
    for slot, row in enumerate(rows):
        module, name, r = mlp.row(slot, j)
        weight = canonical(module)
        out.append(WeightDelta(name, weight_layout(module), left=one_hot(weight.shape[0], r)[:, None],
                               right=(row - weight[r].float().cpu())[None], layer=layer))
    old = mlp.ff2_weight()[:, j].float().cpu()
    new = col * (act / final)
    out.append(WeightDelta(mlp.ff2_name, weight_layout(mlp.ff2), left=(new - old)[:, None],
                           right=one_hot(mlp.d_ff, j)[None], layer=layer))
    return out


@dataclasses.dataclass
class _Context:
    """What every request of one call shares: the layers, their MLPs and what is taken in them, the keys of the
    edits made so far (the memory's, then this call's) and the generic sample."""

    model: nn.Module
    tok: object
    adapter: object
    hp: ShiftSubjectHyperParams
    memory: EditMemory | None
    layers: list[int]
    mlps: dict[int, Mlp]
    in_names: dict[int, str]
    dec_unit: DecodingUnits
    taken: dict[int, set[int]]
    fit: tuple[nn.Module, object] | None = None  # the value's model and adapter when not ``model`` (v_dtype)
    new_keys: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)


def _try_layer(ctx: _Context, layer: int, req: EditRequest, target: list[int], prep, contrast: dict, fact: int,
               entry: dict, then: str) -> list[WeightDelta] | None:
    """Design, fit and check the request's neuron at ``layer``; its deltas, or None if refused there (the screen,
    or not top-1 with ``if_unreached: skip``). Records the neuron's keys in ``ctx`` when it is written."""
    hp, mlp, in_name = ctx.hp, ctx.mlps[layer], ctx.in_names[layer]
    gen = GenericView(*generic_stats(ctx.model, ctx.tok, ctx.adapter, layer, hp))
    earlier = earlier_keys(ctx.memory, ctx.new_keys, f"{in_name}.weight") if hp.memory_weight > 0 else None
    neg = generic_keys(ctx.model, ctx.tok, ctx.adapter, ctx.layers, hp)[layer] if hp.negatives else None
    pool = SilentPool.of(earlier, neg if hp.negative_weight > 0 else None, hp)
    w2 = mlp.ff2_weight().float().cpu()
    j = free_neurons(w2, layer, gen.act_m2 * (w2.double() ** 2).sum(0), 1, ctx.taken[layer], ctx.dec_unit)[0]
    rows, gate = _design(prep.keys[in_name], contrast.get(in_name), j, mlp, gen, pool, hp)
    fires = fires_on(gate, neg) if neg is not None else None
    entry.update({"layer": layer, "neuron": j, "spreads": round(gate.spreads, 2),
                  **({"generic_fires": fires} if fires is not None else {})})
    if hp.max_generic_fires is not None and fires > hp.max_generic_fires:
        log.warning("SHIFT_SUBJECT: the neuron for %r at layer %d would fire on %d of %d generic tokens "
                    "(max_generic_fires %d); %s", req.text + req.target_new, layer, fires, len(neg),
                    hp.max_generic_fires, then)
        return None
    for attempt, steps in enumerate(
        [hp.v_num_grad_steps] + ([hp.v_num_grad_steps + hp.v_retry_steps] if hp.v_retry_steps else [])
    ):
        value = fit_value(*(ctx.fit or (ctx.model, ctx.adapter)), layer, prep, target, hp, steps)
        entry["forward_passes"] += value.forward_passes
        entry["backward_passes"] += value.backward_passes
        entry.update({"value_norm": round(float(value.delta.norm()), 3), "value_loss": round(value.losses[-1], 4),
                      "value_steps": value.steps, "value_fits": attempt + 1})
        neuron = Neuron(j, fact, rows, value.delta, w2[:, j].clone())
        with torch.no_grad():
            ok, act, after = _check(ctx.model, ctx.tok, req, target, mlp, neuron, value.delta, fact, ctx.in_names)
        entry["forward_passes"] += 1
        entry.update({"top1": ok, "activation_at_edit": round(act, 4)})
        if ok or act <= 1e-6:
            break
    if act <= 1e-6 or (not ok and hp.if_unreached == "skip"):
        log.warning("SHIFT_SUBJECT: %r is not top-1 with the neuron at layer %d (activation %.3g); %s",
                    req.text + req.target_new, layer, act, then)
        return None
    final = hp.activation if mlp.kind != "plain" else act
    ctx.new_keys.setdefault(mlp.ff2_param, []).append(one_hot(mlp.d_ff, j) * final)
    ctx.taken[layer].add(j)
    for name in ctx.in_names.values():  # subject keys as the edited model computes them (above L they move)
        ctx.new_keys.setdefault(f"{name}.weight", []).append(after[name][0])
    return _deltas(mlp, layer, j, rows, value.delta.float().cpu() / act, act, hp)


def compute_shift_subject(model: nn.Module, tok, requests: list[EditRequest], hparams: ShiftSubjectHyperParams,
                          *, memory: EditMemory | None = None) -> Computed:
    """Deltas of SHIFT_SUBJECT, computed against ``model`` as it is (not modified)."""
    hp = hparams
    adapter = adapter_for(model, hp)
    layers = list(dict.fromkeys(adapter.check_layer(x) for x in hp.layers))
    mlps = {layer: mlp_of(adapter, layer) for layer in layers}
    ctx = _Context(model, tok, adapter, hp, memory, layers, mlps, {x: mlps[x].ff1[0][0] for x in layers},
                   decoding_units(adapter), {layer: memory_used(memory, mlps[layer]) for layer in layers})
    if hp.v_dtype:
        low = low_precision_copy(model, hp.v_dtype)
        ctx.fit = (low, adapter_for(low, hp))
    templates = context_templates(model, tok, hp.context_template_length_params, hp.context_seed)
    ff2_names = [mlps[x].ff2_name for x in layers]
    in_names = list(ctx.in_names.values())
    deltas: list[WeightDelta] = []
    skipped: list[bool] = []
    info: list[dict] = []
    for req in requests:
        if not req.subject:
            raise ShiftEditError(f"SHIFT_SUBJECT needs the request's subject (request {req.prompt!r})")
        target = encode_target(tok, req.text, req.target_new)
        prep = prepare(model, tok, adapter, req, target, templates, hp.fact_token, in_names, ff2_names, fit=ctx.fit)
        entry: dict = {"target_ids": target, "forward_passes": prep.passes, "backward_passes": 0}
        info.append(entry)
        skipped.append(hp.skip_if_predicted and bool((prep.logits[0].argmax(-1) == torch.tensor(target)).all()))
        if skipped[-1]:
            continue
        room = [x for x in layers if len(ctx.taken[x]) < hp.neurons_per_layer][: hp.try_layers]
        if not room:
            raise ShiftEditError(f"SHIFT_SUBJECT: layers {layers} hold {hp.neurons_per_layer} rewritten neurons "
                                 "each already; add layers or raise neurons_per_layer")
        contrast = _contrast_keys(model, tok, req, in_names, ctx.in_names[max(layers)], hp) if hp.n_contrast else {}
        entry["forward_passes"] += 1 if contrast else 0
        entry["layers_tried"] = []
        fact = keys_fact_index(tok, req, hp)
        for layer in room:
            entry["layers_tried"].append(layer)
            then = "trying the next layer" if layer != room[-1] else "request not applied"
            written = _try_layer(ctx, layer, req, target, prep, contrast, fact, entry, then)
            if written is not None:
                deltas += written
                break
    mem_out = {param: torch.stack(k) for param, k in ctx.new_keys.items()}
    return Computed(WeightDelta.merge(deltas), skipped, info, memory_keys=mem_out)


def keys_fact_index(tok, req: EditRequest, hp: ShiftSubjectHyperParams) -> int:
    """The fact token's index in the bare prompt."""
    return encode_with_fact_index(tok, prompt_template(req), req.subject or "", hp.fact_token)[1]


def prime_shift_subject(model: nn.Module, tok, hparams: ShiftSubjectHyperParams) -> None:
    """Read (or compute) the statistics, the generic sample and the context templates from the model as it is."""
    adapter = adapter_for(model, hparams)
    layers = list(dict.fromkeys(adapter.check_layer(x) for x in hparams.layers))
    prime_generic_stats(model, tok, adapter, layers, hparams)
    if hparams.negatives:
        generic_keys(model, tok, adapter, layers, hparams)
    context_templates(model, tok, hparams.context_template_length_params, hparams.context_seed)


def describe_shift_subject(hp: Mapping[str, Any]) -> list[str]:
    """Run tags: the layers, the statistics, then the capacity, screen and retries."""
    return tag_layers(hp) + tag_statistics(hp) + neuron_tags(hp)


register("SHIFT_SUBJECT", ShiftSubjectHyperParams, compute_shift_subject,
         "a fact written into one FF neuron keyed on the subject's last token (SHIFT_NEURON's closed-form gate, "
         "ROME's contexts), its value fitted by a few steps; paraphrases reach it", uses_memory=True,
         prime=prime_shift_subject, describe=describe_shift_subject)
