# size: one algorithm: its hparams (about 100 lines of documented fields) and its compute loop; the machinery it
#   shares with SHIFT_PLUS and SHIFT_SUBJECT is push.py and neurons.py
"""SHIFT_NEURON: the forward pass shift written into one FF neuron per target token.

Any linear edit of FF2 keyed at the last prompt token disturbs generic text by at least
``push² / (kᵀC⁻¹k)`` per edit, and sequential edits add those disturbances up (the bound in
``eval/reports/shift_plus/``). SHIFT_NEURON escapes it with a nonlinear key: it rewrites one of the
layer's least used FF neurons per target token so that the neuron fires at the edit and stays
silent elsewhere, using the MLP's own activation function as the threshold. No optimiser loop and no
backward pass. For a request with target tokens ``t_0..t_{m-1}`` at layer ``L``:

1. **One batched forward pass** over the prompt and the template filled with other subjects
   (``n_contrast``), teacher-forced on the target: the MLP input ``h`` at every target position,
   block ``L``'s input (for the step search) and the logits at the target positions (skip check).
2. **Gate key** ``g``: least ``gᵀ(Σ + w_c Σ h̃_c h̃_cᵀ)g`` subject to ``gᵀ(h_e - μ) = 1`` and a
   pre-activation of ``-sharpness · threshold`` at the generic mean ``μ`` (``μ, Σ``: mean and covariance
   of the MLP input on generic text, cached statistics ``site="ff1"``; ``h̃_c = h_c - μ`` at the
   contrastive prompts and at the prompt's other target positions). The neuron's FF1 row is
   ``sharpness · g`` (its bias, if any, is kept and accounted for): pre-activation
   ``sharpness · (1 - threshold)`` at the edit and ``-sharpness · threshold ± spread`` on generic text,
   where GELU / ReLU / SiLU give about 0. With a memory, the MLP inputs at earlier edits' positions
   (recorded at every listed layer as the edited model computes them: above the edited layer, an edit's own push
   moves them far) on which the key would come within half the threshold of firing
   become silent keys too (``memory_weight``; up to three solves, an active set), so a new neuron does
   not fire on an earlier edit's prompt. With ``negatives``, a sample of generic tokens (the statistics
   corpus after the tokens the statistics read; cached) joins that active set: the key is kept silent on the
   generic tokens it would nearly fire on, which the Gaussian statistics alone miss (their tails are heavy).
   ``min_spreads`` instead raises the threshold per neuron until generic text sits that many of the key's own
   spreads below the firing point. Gated MLPs (``act(gate h) · up h``) also get an up row
   ``u`` with ``u·h_e = u·μ = 1`` and least variance (a near-constant), scaled so that the neuron's
   activation at the edit is ``activation``.
3. **Neuron**: the layer's cheapest unused neuron (least ``E[x_j²] ‖FF2[:, j]‖²``, from the cached FF2
   statistics). Used: in the :class:`~shift_edit.core.memory.EditMemory` (its FF2 keys are one-hot rows), or
   with an FF2 column parallel to a decoding row (what this algorithm writes, so edits made without a
   memory are not overwritten either).
4. **Push**: the neuron's FF2 column is ``s · D̂[t_i] / activation`` (``D̂``: unit decoding row); ``s`` is
   the smallest push that gives every target token a logit margin of ``margin`` (SHIFT_PLUS's
   :func:`~shift_edit.algorithms.shift.shift_plus.search_push`: blocks ``L..`` re-run from the recorded block
   input with the new neurons in place, for a batch of candidate pushes at once). If no push up to
   ``max_push`` reaches it (``info["reached_margin"]`` False), ``if_unreached`` says what happens: the
   neurons get ``max_push`` (as SHIFT_PLUS), or the request is not applied and its neurons stay free.

Continuation tokens (``i > 0``) that the model already gives with the margin get no neuron, and with
``continuation: free`` the others are not kept silent on the contrastive prompts (after another
subject the same continuation is as right). Several ``layers``: each request goes to the first listed layer
that has fewer than ``neurons_per_layer`` rewritten neurons (counted in the memory; without one, in
this call only), so the layers fill up in the order given. With ``try_layers: k`` a request refused at its layer
(by ``max_generic_fires``, or out of reach of ``max_push`` with ``if_unreached: skip``) tries the next layers with
room, up to ``k`` in all; the first forward pass recorded every listed layer's inputs, so only the searches repeat.

Forward passes per edit (calls of the model): ``1 + search_passes`` per layer searched (``1`` when skipped or
refused by the screen before any search), at most ``1 + try_layers · search_passes``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ...core.deltas import WeightDelta
from ...core.errors import ShiftEditError
from ...core.guard import PromptInputs
from ...core.memory import EditMemory
from ...core.registry import Computed, register, tag_layers, tag_statistics, tag_value
from ...core.requests import EditRequest, encode_target
from ...model.architectures import ModelAdapter, weight_layout
from ...model.hooks import capture_inputs, head_only_at, owned_hooks
from ...model.resume import record_block_inputs, resume_at
from ...model.scoring import pad_batch, pad_id_of
from ..common import EditHyperParams, adapter_for
from .neurons import (
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
from .push import build_batch, margins, search_push, validate_batch_and_search

log = logging.getLogger(__name__)

@dataclasses.dataclass(kw_only=True)
class ShiftNeuronHyperParams(NeuronFields, EditHyperParams):
    """Hparams of SHIFT_NEURON.

    Attributes:
        layers: the layers whose neurons may be rewritten (a request uses one of them, filled in this order).
        try_layers: how many of the listed layers with room (in order) a request may try: it moves on to the next
            when ``max_generic_fires`` refuses its neurons there or (with ``if_unreached: skip``) no push reaches
            the margin; the first forward pass serves every layer, each search costs ``search_passes`` more.
        neurons_per_layer: how many neurons of a layer may be rewritten before the next layer is used.
        threshold: ``β``: the generic mean sits at ``-β`` on the key's scale, the edit at ``1 - β``.
        sharpness: ``α``: FF1 row ``α g``, pre-activation ``α(1 - β)`` at the edit.
        min_spreads: if set, each neuron's ``β`` is raised above ``threshold`` (up to ``max_threshold``) until the
            generic mean sits at least this many of the key's own generic spreads (``√(gᵀΣg)``) below the firing
            point, and ``α`` grows with it so that the pre-activation at the edit stays ``α(1 - threshold)``;
            ``None``: ``β = threshold`` for every neuron.
        max_threshold: the largest ``β`` that ``min_spreads`` may use; a key that cannot reach ``min_spreads``
            below it gets the ``β`` (on the grid) with the most spreads, and ``info["spreads"]`` says so.
        activation: the neuron's activation at the edit (gated MLPs; plain MLPs get ``act(α(1 - β))``).
        n_contrast: other subjects that fill the template; the neuron is kept silent on them.
        n_prefixes: the prompt behind this many fixed context prefixes (SHIFT_PLUS's): the neuron must fire
            on each of them as on the prompt (0: the prompt only).
        contrast_weight: weight of each silent key in units of generic-text tokens.
        memory_weight: weight of each earlier edit's key (the memory's MLP inputs at this layer), on which
            the new neuron is kept silent too (0: not at all).
        negatives: generic tokens (MLP inputs on the statistics corpus, after the tokens the statistics read) on
            which a new key is kept silent if it would come within half the threshold of firing (an active
            set, as for the memory's keys); 0: none.
        negative_weight: weight of each such silent generic token.
        max_generic_fires: with ``negatives``, a request is not applied (``info["generic_fires"]`` says why) if
            one of its neurons would fire (positive gate pre-activation) on more than this many of the sample's
            tokens; ``None``: no check. ``negative_weight: 0`` uses the sample for this check only.
        negative_reach: a generic token joins when the key would bring it within this fraction of the threshold
            of firing (earlier edits' keys: within half).
        continuation: ``free`` (tokens after the first need no silence on the contrastive prompts) or
            ``contrast``.
        ridge: relative ridge on the generic covariance ``Σ``.
        margin: logit margin of every target token over the runner-up that the push aims at.
        max_push: cap on the push ``s`` (residual-stream norm at the edit).
        if_unreached: ``max_push`` (apply the capped push) or ``skip`` (leave the model as it was) when no
            push up to ``max_push`` reaches the margin.
        search_passes / search_points: batched partial forward passes of the step search, candidates each.
        mom2_*: the statistics (as ROME's; the same cache, ``site="ff1"`` for the MLP input).
    """

    ALG_NAME = "SHIFT_NEURON"

    n_prefixes: int = 0
    continuation: Literal["free", "contrast"] = "free"
    margin: float = 0.25
    max_push: float = 1200.0
    if_unreached: Literal["max_push", "skip"] = "max_push"
    search_passes: int = 2
    search_points: int = 12
    mom2_corpus: str | None = None
    mom2_n_tokens: int = 50_000
    mom2_max_length: int = 128
    mom2_dtype: Literal["float32", "float64"] = "float32"

    def validate(self) -> None:
        super().validate()
        validate_neuron_fields(self)
        self._require_finite("max_push", positive=True)
        validate_batch_and_search(self)

    @property
    def forward_passes(self) -> int:
        """Model calls per edited (not skipped) request that its first layer takes; each further layer it tries
        (``try_layers``) adds ``search_passes``."""
        return 1 + self.search_passes


def _needing_neurons(logits: torch.Tensor, target: list[int], margin: float) -> list[int]:
    """The target positions that get a neuron: the first, and any later one the model does not already give
    with ``margin`` (``logits``: the prompt's ``[len(target), vocab]`` at the positions predicting the target,
    teacher-forced)."""
    wanted = []
    for i, t in enumerate(target):
        if i > 0:
            lg = logits[i].float().cpu()
            if float(lg[t] - lg.scatter(0, torch.tensor([t]), float("-inf")).max()) >= margin:
                continue
        wanted.append(i)
    return wanted


def _design_neuron(h: torch.Tensor, batch, i: int, j: int, mlp: Mlp, gen: GenericView, pool: SilentPool | None,
                   w2: torch.Tensor, direction: torch.Tensor, hp: ShiftNeuronHyperParams) -> tuple[Neuron, Gate]:
    """Neuron ``j``'s new FF1 rows for target position ``i`` (``h``: the batch's MLP inputs ``[rows, seq, d]``,
    float64): silent on the contrastive prompts, on the prompt's other target positions and, with a ``pool``, on
    the pooled keys it would nearly fire on (a few solves, an active set)."""
    pos = batch.positions[0]
    n_var = batch.n_variants
    others = [h[0, p] for k, p in enumerate(pos) if k != i]
    contrast = ([h[r, batch.positions[r][i]] for r in range(n_var, len(batch.seqs))]
                if hp.continuation == "contrast" or i == 0 else [])
    silent = torch.stack(contrast + others) if contrast or others else h[0, :0]
    weights = torch.full((len(silent),), hp.contrast_weight, dtype=torch.float64)
    bias = gate_bias(mlp, j)
    h_e = torch.stack([h[r, batch.positions[r][i]] for r in range(n_var)])  # the prompt and its variants
    rows, gate = neuron_rows(mlp, gen, h_e, silent, weights, bias, pool, hp)
    return Neuron(j, pos[i], rows, direction, w2[:, j].clone()), gate


def _search_push(model: nn.Module, adapter: ModelAdapter, layer: int, mlp: Mlp, neurons: list[Neuron],
                 block_in: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pos: list[int], target: list[int],
                 hp: ShiftNeuronHyperParams, later: Sequence[str] = ()
                 ) -> tuple[float | None, int, dict[int, float], dict[str, torch.Tensor]]:
    """The smallest push giving every target token ``hp.margin`` with the new neurons in place (``None`` if none
    up to ``max_push``), the passes it took, each neuron's activation at its edit position, and the inputs of the
    modules ``later`` (MLP inputs of layers above ``layer``) at the neurons' positions in the edited model
    (``[n_neurons, d]`` each; empty if no push was chosen). Blocks ``layer..`` are re-run from ``block_in`` (the
    prompt's recorded block input) for a batch of candidate pushes at once."""
    fired: dict[int, float] = {}
    seen: dict[float, dict[str, torch.Tensor]] = {}  # candidate push -> its rows of the ``later`` inputs
    at = torch.tensor([n.pos for n in neurons], dtype=torch.long)

    def ff2_hook(_m, args, out, scales):
        x = args[0]
        x3 = x.reshape(scales.numel(), -1, x.shape[-1])  # OPT flattens its MLP input
        add = torch.zeros(*x3.shape[:2], out.shape[-1], dtype=torch.float32, device=x.device)
        for n in neurons:
            a = x3[..., n.j].float()  # [rows, seq]
            fired[n.j] = float(a[0, n.pos])
            scale = scales.view(-1, 1).to(x.device) / max(fired[n.j], 1e-6)
            add += (a * scale)[..., None] * n.direction.to(x.device) - a[..., None] * n.old_col.to(x.device)
        return out + add.reshape(out.shape).to(out.dtype)

    def reaches(grid: torch.Tensor) -> torch.Tensor:
        scales = grid.to(torch.float32)
        # the later modules are hooked before resume_at hides the blocks below ``layer``; the head runs at the
        # target positions only
        with owned_hooks() as hooks, capture_inputs(model, list(later)) as cap, \
                resume_at(adapter, layer, block_in.repeat(len(scales), 1, 1)), \
                head_only_at(model, (len(scales), ids.shape[1]), [pos] * len(scales)) as gather:
            ff1_hooks(hooks, mlp, neurons)
            hooks.forward_hook(mlp.ff2, lambda m, a, o: ff2_hook(m, a, o, scales))
            lg = torch.stack(gather(model(input_ids=ids.repeat(len(scales), 1),
                                          attention_mask=mask.repeat(len(scales), 1), use_cache=False).logits))
        for r, s in enumerate(grid.tolist()):
            seen[s] = {name: x.reshape(len(scales), ids.shape[1], -1)[r, at].float().cpu()
                       for name, x in cap.inputs.items()}
        ok = margins(lg, [list(range(len(pos)))], target, list(range(len(scales)))) >= hp.margin
        return ok & all(a > 1e-6 for a in fired.values())

    push, passes = search_push(reaches, hp.max_push, hp.search_points, hp.search_passes)
    chosen = push if push is not None else (hp.max_push if hp.if_unreached == "max_push" else None)
    return push, passes, fired, seen.get(chosen, {})  # no push chosen (None): nothing to keep


def _neuron_deltas(mlp: Mlp, layer: int, neurons: list[Neuron], fired: dict[int, float], push: float,
                   hp: ShiftNeuronHyperParams) -> tuple[list[WeightDelta], list[torch.Tensor]]:
    """The rank-one deltas writing ``neurons`` (FF1 rows, FF2 column ``push · D̂ / activation``) and their FF2
    memory keys (one-hot rows scaled by the activation at the edit)."""
    deltas, keys = [], []
    for n in neurons:
        final = hp.activation if mlp.kind != "plain" else fired[n.j]
        rows = list(n.rows)
        if mlp.kind != "plain":
            rows[1] = rows[1] * (hp.activation / fired[n.j])  # the up row: activation at the edit = `activation`
        for slot, row in enumerate(rows):
            module, name, r = mlp.row(slot, n.j)
            weight = canonical(module)
            deltas.append(WeightDelta(name, weight_layout(module), left=one_hot(weight.shape[0], r)[:, None],
                                      right=(row - weight[r].float().cpu())[None], layer=layer))
        col = (push / final) * n.direction
        deltas.append(WeightDelta(mlp.ff2_name, weight_layout(mlp.ff2), left=(col - n.old_col)[:, None],
                                  right=one_hot(mlp.d_ff, n.j)[None], layer=layer))
        keys.append(one_hot(mlp.d_ff, n.j) * final)
    return deltas, keys


# length: the per-request loop (design neurons, screen them, search the push, try the next layer) keeps the pool of
#   silent keys and the neurons taken across requests; its steps are helpers already (_design_neuron, _search_push,
#   _neuron_deltas)
@torch.no_grad()
def compute_shift_neuron(model: nn.Module, tok, requests: list[EditRequest], hparams: ShiftNeuronHyperParams,
                         *, memory: EditMemory | None = None) -> Computed:
    """Deltas of SHIFT_NEURON, computed against ``model`` as it is (not modified)."""
    hp = hparams
    adapter = adapter_for(model, hp)
    layers = list(dict.fromkeys(adapter.check_layer(x) for x in hp.layers))
    mlps = {layer: mlp_of(adapter, layer) for layer in layers}
    device = next(model.parameters()).device
    pad = pad_id_of(tok)
    dec_unit = decoding_units(adapter)
    taken: dict[int, set[int]] = {layer: memory_used(memory, mlps[layer]) for layer in layers}
    in_names = {x: mlps[x].ff1[0][0] for x in layers}  # each layer's MLP input: this edit's keys for later edits

    deltas: list[WeightDelta] = []
    skipped: list[bool] = []
    info: list[dict] = []
    new_keys: dict[str, list[torch.Tensor]] = {}
    kept = PromptInputs(adapter)
    for req in requests:
        target = encode_target(tok, req.text, req.target_new)
        room = [x for x in layers if len(taken[x]) + len(target) <= hp.neurons_per_layer][: hp.try_layers]
        if not room:
            raise ShiftEditError(f"SHIFT_NEURON: layers {layers} hold {hp.neurons_per_layer} rewritten neurons each "
                                 "already; add layers or raise neurons_per_layer")
        batch = build_batch(tok, req, target, n_prefixes=hp.n_prefixes, n_contrast=hp.n_contrast)
        ids, mask = pad_batch(batch.seqs, pad, device)
        pos = batch.positions[0]
        head_at = [pos] + [[]] * (len(batch.seqs) - 1)  # the prompt's target positions only
        with record_block_inputs(adapter) as blocks_in, capture_inputs(model, list(in_names.values())) as cap, \
                head_only_at(model, tuple(ids.shape), head_at) as gather:
            logits = gather(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)[0]  # [len(pos), V]
        for x in layers:  # the guard's pass over the prompt starts at the first edited block
            kept.add(x, req.text, blocks_in[x][0, : pos[0] + 1])
        if hp.skip_if_predicted and bool((logits.argmax(-1).cpu() == torch.tensor(target)).all()):
            skipped.append(True)
            info.append({"target_ids": target, "forward_passes": 1})
            continue
        skipped.append(False)
        wanted = _needing_neurons(logits, target, hp.margin)
        entry: dict = {"target_ids": target, "forward_passes": 1, "layers_tried": []}
        info.append(entry)
        for layer in room:
            entry["layers_tried"].append(layer)
            mlp = mlps[layer]
            in_name = in_names[layer]
            h = cap.inputs[in_name].double().cpu().reshape(ids.shape[0], ids.shape[1], -1)
            gen = GenericView(*generic_stats(model, tok, adapter, layer, hp))
            earlier = earlier_keys(memory, new_keys, f"{in_name}.weight") if hp.memory_weight > 0 else None
            neg = generic_keys(model, tok, adapter, layers, hp)[layer] if hp.negatives else None
            pool = SilentPool.of(earlier, neg if hp.negative_weight > 0 else None, hp)
            w2 = mlp.ff2_weight().float().cpu()
            js = free_neurons(w2, layer, gen.act_m2 * (w2.double() ** 2).sum(0), len(wanted), taken[layer], dec_unit)
            designed = [_design_neuron(h, batch, i, j, mlp, gen, pool, w2, dec_unit[target[i]].clone(), hp)
                        for i, j in zip(wanted, js)]
            neurons = [n for n, _gate in designed]
            generic_fires = [fires_on(gate, neg) for _n, gate in designed] if neg is not None else []
            entry.update({"layer": layer, "reached_margin": False, "push": None, "neurons": [],
                          "spreads": [round(g.spreads, 2) for _n, g in designed],
                          "thresholds": [round(g.threshold, 4) for _n, g in designed],
                          **({"generic_fires": generic_fires} if neg is not None else {})})
            entry.pop("activation_at_edit", None)
            then = "trying the next layer" if layer != room[-1] else "request not applied"
            if hp.max_generic_fires is not None and max(generic_fires, default=0) > hp.max_generic_fires:
                log.warning("SHIFT_NEURON: a neuron for %r at layer %d would fire on %d of %d generic tokens "
                            "(max_generic_fires %d); %s", req.text + req.target_new, layer, max(generic_fires),
                            len(neg), hp.max_generic_fires, then)
                continue
            above = [name for x, name in in_names.items() if x > layer]
            push, search, fired, after = _search_push(model, adapter, layer, mlp, neurons, blocks_in[layer][:1],
                                                      ids[:1], mask[:1], pos, target, hp, above)
            entry["forward_passes"] += search
            entry.update({"reached_margin": push is not None, "push": push, "neurons": [n.j for n in neurons],
                          "activation_at_edit": dict(fired)})
            if push is None:
                fires = all(a > 1e-6 for a in fired.values())  # a neuron not firing at the edit carries no push
                capped = hp.if_unreached == "max_push" and fires
                log.warning("SHIFT_NEURON: no push up to max_push %g gives %r a margin of %g at layer %d; %s",
                            hp.max_push, req.text + req.target_new, hp.margin, layer,
                            "applying max_push" if capped else then)
                if not capped:
                    continue
                push = entry["push"] = hp.max_push
            written, ff2_keys = _neuron_deltas(mlp, layer, neurons, fired, push, hp)
            deltas += written
            new_keys.setdefault(mlp.ff2_param, []).extend(ff2_keys)
            taken[layer].update(n.j for n in neurons)
            for x, name in in_names.items():  # this edit's prompt keys at every layer a later neuron may use:
                if name in after:  # above the edit, as the edited model computes them (the push moves them far)
                    new_keys.setdefault(f"{name}.weight", []).extend(after[name])
                    continue
                hx = cap.inputs[name].float().cpu().reshape(ids.shape[0], ids.shape[1], -1)
                new_keys.setdefault(f"{name}.weight", []).extend(hx[0, n.pos] for n in neurons)
            entry["activation"] = hp.activation if mlp.kind != "plain" else None
            break
    mem_out = {param: torch.stack(k) for param, k in new_keys.items()}
    return Computed(WeightDelta.merge(deltas), skipped, info, memory_keys=mem_out, prompt_inputs=kept)


def prime_shift_neuron(model: nn.Module, tok, hparams: ShiftNeuronHyperParams) -> None:
    """Read (or compute) the MLP-input statistics of every listed layer and the generic sample (``negatives``)
    from the model as it is: a sequential run calls it before its first edit."""
    adapter = adapter_for(model, hparams)
    layers = list(dict.fromkeys(adapter.check_layer(x) for x in hparams.layers))
    prime_generic_stats(model, tok, adapter, layers, hparams)
    if hparams.negatives:
        generic_keys(model, tok, adapter, layers, hparams)


def describe_shift_neuron(hp: Mapping[str, Any]) -> list[str]:
    """Run tags: the layers, the statistics, the margin, then the capacity, screen and retries."""
    return tag_layers(hp) + tag_statistics(hp) + tag_value(hp, "margin") + neuron_tags(hp)


register("SHIFT_NEURON", ShiftNeuronHyperParams, compute_shift_neuron,
         "forward pass shift written into one FF neuron per target token, keyed with a threshold "
         "(closed-form key against cached statistics, push sized by batched partial forward passes); "
         "no backward pass", uses_memory=True, prime=prime_shift_neuron, describe=describe_shift_neuron)
