"""SHIFT_NEURON: the forward pass shift written into one FF neuron per target token.

Any linear edit of FF2 keyed at the last prompt token disturbs generic text by at least
``push² / (kᵀC⁻¹k)`` per edit, and sequential edits add those disturbances up (the bound in
``eval/reports/shift_plus/``). SHIFT_NEURON escapes it with a nonlinear key: it rewrites one of the
layer's least used FF neurons per target token so that the neuron fires at the edit and stays
silent elsewhere, using the MLP's own activation function as the threshold. No optimiser loop and no
backward pass. For a request with target tokens ``t_0..t_{m-1}`` at layer ``L``:

1. **One batched forward pass** over the prompt and the template filled with other subjects
   (``n_contrast``), teacher-forced on the target: the MLP input ``h`` at every target position,
   block ``L``'s input (for the step search) and the logits (skip check).
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
   statistics). Used: in the :class:`~shift_edit.memory.EditMemory` (its FF2 keys are one-hot rows), or
   with an FF2 column parallel to a decoding row (what this algorithm writes, so edits made without a
   memory are not overwritten either).
4. **Push**: the neuron's FF2 column is ``s · D̂[t_i] / activation`` (``D̂``: unit decoding row); ``s`` is
   the smallest push that gives every target token a logit margin of ``margin`` (SHIFT_PLUS's
   :func:`~shift_edit.algorithms.shift_plus.search_push`: blocks ``L..`` re-run from the recorded block
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
import math
import weakref
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..architectures import ModelAdapter, from_param_layout, weight_layout
from ..covariance import generic_sample, layer_stats
from ..deltas import WeightDelta
from ..editing import apply_algo_to_model
from ..errors import ShiftEditError
from ..hooks import capture_inputs, owned_hooks
from ..memory import EditMemory
from ..registry import Computed, register
from ..requests import EditRequest, encode_target
from ..resume import record_block_inputs, resume_at
from ..scoring import pad_batch, pad_id_of
from .common import EditHyperParams, adapter_for
from .shift_plus import _margins, build_batch, search_push, validate_batch_and_search

log = logging.getLogger(__name__)

#: solves of the gate key that add the earlier-edit keys it would fire on (an active set)
_ACTIVE_ROUNDS = 3


@dataclasses.dataclass(kw_only=True)
class ShiftNeuronHyperParams(EditHyperParams):
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

    neurons_per_layer: int = 256
    try_layers: int = 1
    threshold: float = 0.7
    sharpness: float = 25.0
    min_spreads: float | None = None
    max_threshold: float = 0.95
    activation: float = 8.0
    n_contrast: int = 16
    n_prefixes: int = 0
    contrast_weight: float = 1000.0
    memory_weight: float = 1000.0
    negatives: int = 0
    negative_weight: float = 1000.0
    negative_reach: float = 0.5
    max_generic_fires: int | None = None
    continuation: Literal["free", "contrast"] = "free"
    ridge: float = 0.01
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
        if not (math.isfinite(self.threshold) and 0 <= self.threshold < 1):
            self._fail("threshold", self.threshold, "it must be in [0, 1)")
        self._require_finite("sharpness", "activation", "max_push", positive=True)
        if self.min_spreads is not None:
            self._require_finite("min_spreads", positive=True)
            if not (math.isfinite(self.max_threshold) and self.threshold <= self.max_threshold < 1):
                self._fail("max_threshold", self.max_threshold, "it must be in [threshold, 1)")
        self._require_finite("contrast_weight", "memory_weight", "negative_weight", "ridge")
        if self.negatives < 0:
            self._fail("negatives", self.negatives, "it must be >= 0")
        if self.max_generic_fires is not None and (self.max_generic_fires < 0 or not self.negatives):
            self._fail("max_generic_fires", self.max_generic_fires, "it must be >= 0, with negatives > 0")
        if not (math.isfinite(self.negative_reach) and 0 < self.negative_reach <= 1):
            self._fail("negative_reach", self.negative_reach, "it must be in (0, 1]")
        validate_batch_and_search(self)
        if self.neurons_per_layer < 1:
            self._fail("neurons_per_layer", self.neurons_per_layer, "it must be >= 1")
        if not 1 <= self.try_layers <= len(self.layers):
            self._fail("try_layers", self.try_layers, f"it must be in [1, {len(self.layers)}] (the listed layers)")

    @property
    def forward_passes(self) -> int:
        """Model calls per edited (not skipped) request that its first layer takes; each further layer it tries
        (``try_layers``) adds ``search_passes``."""
        return 1 + self.search_passes


# --- one layer's MLP -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Mlp:
    """The matrices of one layer's MLP and how a neuron ``j`` sits in them."""

    layer: int
    kind: Literal["plain", "gated", "fused"]
    ff1: list[tuple[str, nn.Module]]  # plain / fused: [ff1]; gated: [gate, up]
    ff2_name: str
    ff2: nn.Module
    d_ff: int

    @property
    def ff2_param(self) -> str:
        return f"{self.ff2_name}.weight"

    def ff2_weight(self) -> torch.Tensor:
        """FF2's weight as ``[d_model, d_ff]``."""
        return _canonical(self.ff2)

    def row(self, slot: int, j: int) -> tuple[nn.Module, str, int]:
        """(module, name, output row) of the neuron's gate (slot 0) or up (slot 1) row."""
        if self.kind == "gated":
            name, module = self.ff1[slot]
            return module, name, j
        name, module = self.ff1[0]
        return module, name, j + slot * self.d_ff


def _canonical(module: nn.Module) -> torch.Tensor:
    """A projection's weight viewed as ``[out, in]`` (no copy)."""
    return from_param_layout(module.weight.detach(), weight_layout(module))


def _mlp(adapter: ModelAdapter, layer: int) -> _Mlp:
    names = adapter.ff1_names(layer)
    ff2_name = adapter.ff2_name(layer)
    ff2 = adapter.module(ff2_name)
    d_ff = int(_canonical(ff2).shape[1])
    ff1 = [(n, adapter.module(n)) for n in names]
    outs = [int(_canonical(m).shape[0]) for _n, m in ff1]
    if len(ff1) == 2 and outs == [d_ff, d_ff]:
        kind = "gated"
    elif len(ff1) == 1 and outs == [d_ff]:
        kind = "plain"
    elif len(ff1) == 1 and outs == [2 * d_ff]:
        kind = "fused"
    else:
        raise ShiftEditError(f"SHIFT_NEURON: cannot read the MLP of layer {layer} (FF1 {names} with outputs "
                             f"{outs}, FF2 input {d_ff})")
    mlp = _Mlp(layer, kind, ff1, ff2_name, ff2, d_ff)
    if kind != "plain" and getattr(mlp.row(1, 0)[0], "bias", None) is not None:
        raise ShiftEditError(f"SHIFT_NEURON: gated MLPs with an up-projection bias are not supported (layer {layer})")
    return mlp


# --- statistics, per process ---------------------------------------------------------------------
#: (μ, Σ⁻¹, E[x_j²]) per model object, then per (layer, statistics settings): read once per process, so
#: later calls on an edited model neither fingerprint it nor reload the statistics (weakly keyed: a new
#: model object never sees another's statistics, even one that reuses a freed model's id)
_GENERIC: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple]]" = weakref.WeakKeyDictionary()


def _generic(model: nn.Module, tok, adapter: ModelAdapter, layer: int, hp: ShiftNeuronHyperParams
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(μ, Σ⁻¹, E[x_j²], Σ)`` (float64): the MLP input's mean and inverse (ridged) covariance on generic text,
    the second moment of each neuron's activation (FF2's input), and the covariance itself (no ridge)."""
    cache = _GENERIC.setdefault(model, {})
    key = (layer, hp.ridge, hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_max_length, hp.mom2_dtype)
    if key not in cache:
        common = dict(corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens, max_length=hp.mom2_max_length,
                      dtype=hp.mom2_dtype, adapter=adapter, progress=False)
        inputs = layer_stats(model, tok, [layer], site="ff1", **common)[layer]
        ff2 = layer_stats(model, tok, [layer], **common)[layer]
        mu = inputs.mean.double()
        sigma = inputs.mom2.double() - torch.outer(mu, mu)
        sigma = (sigma + sigma.T) / 2
        ridged = sigma + (hp.ridge * float(torch.diagonal(sigma).mean()) + 1e-12) * torch.eye(len(mu), dtype=torch.float64)
        cache[key] = (mu, torch.linalg.inv(ridged), torch.diagonal(ff2.mom2).double().clone(), sigma)
    return cache[key]


#: MLP inputs of generic tokens per model object and (layers, settings) (see ``negatives``)
_NEGATIVES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, dict[int, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def _negatives(model: nn.Module, tok, adapter: ModelAdapter, layers: list[int], hp: ShiftNeuronHyperParams
               ) -> dict[int, torch.Tensor]:
    """``hp.negatives`` generic tokens' MLP inputs at each layer (float64 ``[n, d]``): the statistics corpus's
    texts after those whose tokens the statistics read (:func:`~shift_edit.covariance.generic_sample`)."""
    cache = _NEGATIVES.setdefault(model, {})
    key = (tuple(layers), hp.negatives, hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_max_length)
    if key not in cache:
        sample = generic_sample(model, tok, layers, corpus=hp.mom2_corpus, skip_tokens=hp.mom2_n_tokens,
                                n_tokens=hp.negatives, max_length=hp.mom2_max_length, adapter=adapter)
        cache[key] = {layer: torch.unique(x, dim=0).double() for layer, x in sample.items()}  # repeats: no new key
    return cache[key]


def neuron_key(sigma_inv: torch.Tensor, mu: torch.Tensor, h_e: torch.Tensor, silent: torch.Tensor | None,
               w_c: float | torch.Tensor, at_edit: float, at_mean: float) -> torch.Tensor:
    """``w`` with ``wᵀ(h_e - μ) = at_edit`` (for each row of ``h_e``, if it is ``[n, d]``) and ``wᵀμ = at_mean``
    and the least ``wᵀAw``,
    ``A = Σ + Σ_c w_c (h_c - μ)(h_c - μ)ᵀ`` over the ``silent`` rows (``w_c``: one weight, or one per row;
    Woodbury on ``Σ⁻¹``; float64)."""
    edits = h_e[None] if h_e.dim() == 1 else h_e
    b = torch.cat([(edits - mu).T, mu[:, None]], 1)  # [d, n_edit + 1]
    aib = sigma_inv @ b
    weights = torch.as_tensor(w_c, dtype=torch.float64).expand(len(silent)) if silent is not None else None
    if silent is not None and len(silent) and bool((weights > 0).all()):
        hc = (silent - mu).T  # [d, n]
        shc = sigma_inv @ hc
        small = torch.diag(1.0 / weights) + hc.T @ shc
        aib = aib - shc @ torch.linalg.solve(small, shc.T @ b)
    rhs = torch.tensor([at_edit] * len(edits) + [at_mean], dtype=torch.float64)
    return aib @ torch.linalg.solve(b.T @ aib, rhs)


#: the thresholds ``β`` tried (between ``threshold`` and ``max_threshold``) when ``min_spreads`` is set
_THRESHOLD_GRID = 24


@dataclasses.dataclass
class _Gate:
    """A neuron's gate key and where generic text sits on it."""

    g: torch.Tensor  # key: gᵀ(h_e - μ) = 1 (float64)
    sharpness: float  # α: the FF1 row is α g
    threshold: float  # β: the generic mean's pre-activation is -α β
    spreads: float  # β / √(gᵀΣg): how many generic spreads the firing point sits above the mean
    bias: float = 0.0  # the row's existing FF1 bias (kept)

    @property
    def fires_at(self) -> float:
        """``gᵀx`` where the pre-activation ``α gᵀx + bias`` crosses 0 (the generic mean sits ``β`` below)."""
        return -self.bias / self.sharpness


def gate_key(sigma_inv: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, h_e: torch.Tensor,
             silent: torch.Tensor | None, w_c: float | torch.Tensor, bias: float, hp: ShiftNeuronHyperParams) -> _Gate:
    """The gate key for ``hp.threshold``, or with ``hp.min_spreads`` the smallest ``β`` on a grid up to
    ``hp.max_threshold`` whose firing point sits ``min_spreads`` generic spreads above the mean (``α`` scaled
    so that the edit's pre-activation stays ``α(1 - threshold)``). ``bias``: the row's existing FF1 bias."""
    def spreads(g: torch.Tensor, beta: float) -> float:
        return beta / math.sqrt(max(float(g @ sigma @ g), 1e-30))

    if hp.min_spreads is None:
        g = neuron_key(sigma_inv, mu, h_e, silent, w_c, 1.0, -hp.threshold - bias / hp.sharpness)
        return _Gate(g, hp.sharpness, hp.threshold, spreads(g, hp.threshold), bias)
    edit_pre = hp.sharpness * (1 - hp.threshold)
    # the key is linear in its value at the mean: g(c) = g_1 + c g_0 (one solve each)
    g1 = neuron_key(sigma_inv, mu, h_e, silent, w_c, 1.0, 0.0)
    g0 = neuron_key(sigma_inv, mu, h_e, silent, w_c, 0.0, 1.0)
    best: _Gate | None = None
    for beta in torch.linspace(hp.threshold, hp.max_threshold, _THRESHOLD_GRID, dtype=torch.float64).tolist():
        alpha = edit_pre / (1 - beta)
        g = g1 + (-beta - bias / alpha) * g0
        gate = _Gate(g, alpha, beta, spreads(g, beta), bias)
        if gate.spreads >= hp.min_spreads:
            return gate
        best = gate if best is None or gate.spreads > best.spreads else best
    return best


@dataclasses.dataclass
class _SilentPool:
    """Keys a new gate key may have to be silent on: earlier edits' MLP inputs, then generic sample tokens."""

    keys: torch.Tensor  # [n, d] float64
    weights: torch.Tensor  # [n]: memory_weight, then negative_weight
    reach: torch.Tensor  # [n]: the fraction of the threshold within which a key joins the silent set

    @classmethod
    def of(cls, earlier: torch.Tensor | None, negatives: torch.Tensor | None, hp: ShiftNeuronHyperParams
           ) -> "_SilentPool | None":
        parts = [(x, w, r) for x, w, r in ((earlier, hp.memory_weight, 0.5),
                                           (negatives, hp.negative_weight, hp.negative_reach)) if x is not None]
        if not parts:
            return None

        def per_key(value: float, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x),), value, dtype=torch.float64)

        return cls(torch.cat([x for x, _w, _r in parts]), torch.cat([per_key(w, x) for x, w, _r in parts]),
                   torch.cat([per_key(r, x) for x, _w, r in parts]))

    def risky(self, gate: _Gate, active: torch.Tensor) -> torch.Tensor:
        """Indices not yet in ``active`` whose gate pre-activation is within their reach of firing."""
        near = ((self.keys @ gate.g) > gate.fires_at - gate.threshold * self.reach).nonzero()[:, 0]
        return near[~torch.isin(near, active)]


# --- which neurons are free ------------------------------------------------------------------------
def _earlier_keys(memory: EditMemory | None, new_keys: dict[str, list[torch.Tensor]], param: str
                  ) -> torch.Tensor | None:
    """The MLP inputs at earlier edits' positions for ``param`` (memory, then this call's), float64."""
    rows = [memory.keys(param)] if memory is not None and memory.keys(param) is not None else []
    rows += [torch.stack(new_keys[param])] if new_keys.get(param) else []
    return torch.cat(rows).double() if rows else None


def _memory_used(memory: EditMemory | None, mlp: _Mlp) -> set[int]:
    keys = memory.keys(mlp.ff2_param) if memory is not None else None
    if keys is None or not len(keys) or keys.shape[1] != mlp.d_ff:
        return set()
    return {int(j) for j in keys.abs().argmax(1)}


def _written(col: torch.Tensor, dec_unit: torch.Tensor) -> bool:
    """Is this FF2 column a multiple of a decoding row (a neuron this algorithm wrote)?"""
    n = float(col.norm())
    return n > 0 and float((dec_unit @ (col / n)).abs().max()) > 0.9999


def _free_neurons(w2: torch.Tensor, layer: int, cost: torch.Tensor, n: int, exclude: set[int],
                  dec_unit: torch.Tensor) -> list[int]:
    """The ``n`` cheapest neurons not in ``exclude`` whose FF2 column (``w2``: ``[d_model, d_ff]``) this
    algorithm did not write."""
    out: list[int] = []
    for j in (int(x) for x in cost.argsort()):
        if j in exclude or _written(w2[:, j], dec_unit):
            continue
        out.append(j)
        if len(out) == n:
            return out
    raise ShiftEditError(f"SHIFT_NEURON: layer {layer} has no free neuron left; add layers")


# --- the search with the new neurons in place ----------------------------------------------------------
@dataclasses.dataclass
class _Neuron:
    j: int
    pos: int  # the prompt position it fires at
    rows: list[torch.Tensor]  # [gate row (α g)] or [gate row, up row u] (float32, canonical)
    direction: torch.Tensor  # D̂[t] (float32)
    old_col: torch.Tensor  # FF2[:, j] before the edit (float32)


def _ff1_hooks(hooks, mlp: _Mlp, neurons: list[_Neuron]) -> None:
    """Replace the neurons' FF1 outputs by their new rows' (bias kept), as the edited weights would."""
    by_module: dict[int, tuple[nn.Module, list[int], list[torch.Tensor]]] = {}
    for nrn in neurons:
        for slot, row in enumerate(nrn.rows):
            module, _name, r = mlp.row(slot, nrn.j)
            entry = by_module.setdefault(id(module), (module, [], []))
            entry[1].append(r)
            entry[2].append(row)
    for module, idx, rows in by_module.values():
        mat = torch.stack(rows)
        bias = getattr(module, "bias", None)
        b = bias.detach()[idx].float() if bias is not None else torch.zeros(len(idx))

        def hook(_m, args, out, idx=idx, mat=mat, b=b):
            x = args[0]
            out = out.clone()
            out[..., idx] = (x.float() @ mat.to(x.device).T + b.to(x.device)).to(out.dtype)
            return out

        hooks.forward_hook(module, hook)


@dataclasses.dataclass
class _Generic:
    """A layer's generic-text view: MLP-input mean, Σ⁻¹, E[x²] of the FF neurons, Σ (:func:`_generic`)."""

    mu: torch.Tensor
    sigma_inv: torch.Tensor
    act_m2: torch.Tensor
    sigma: torch.Tensor


def _needing_neurons(logits: torch.Tensor, pos: list[int], target: list[int], margin: float) -> list[int]:
    """The target positions that get a neuron: the first, and any later one the model does not already give
    with ``margin`` (``logits``: the prompt's ``[seq, vocab]``, teacher-forced)."""
    wanted = []
    for i, t in enumerate(target):
        if i > 0:
            lg = logits[pos[i]].float().cpu()
            if float(lg[t] - lg.scatter(0, torch.tensor([t]), float("-inf")).max()) >= margin:
                continue
        wanted.append(i)
    return wanted


def _bias(mlp: _Mlp, j: int) -> float:
    """Neuron ``j``'s existing gate (FF1) bias, 0 without one."""
    module, _name, r = mlp.row(0, j)
    bias = getattr(module, "bias", None)
    return float(bias[r]) if bias is not None else 0.0


def _design_neuron(h: torch.Tensor, batch, i: int, j: int, mlp: _Mlp, gen: _Generic, pool: _SilentPool | None,
                   w2: torch.Tensor, direction: torch.Tensor, hp: ShiftNeuronHyperParams) -> tuple[_Neuron, _Gate]:
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
    bias = _bias(mlp, j)
    h_e = torch.stack([h[r, batch.positions[r][i]] for r in range(n_var)])  # the prompt and its variants
    gate = gate_key(gen.sigma_inv, gen.sigma, gen.mu, h_e, silent if len(silent) else None, weights, bias, hp)
    active = torch.zeros(0, dtype=torch.long)
    for _round in range(_ACTIVE_ROUNDS if pool is not None else 0):
        new = pool.risky(gate, active)
        if not len(new):
            break
        active = torch.cat([active, new])
        gate = gate_key(gen.sigma_inv, gen.sigma, gen.mu, h_e, torch.cat([silent, pool.keys[active]]),
                        torch.cat([weights, pool.weights[active]]), bias, hp)
    rows = [(gate.sharpness * gate.g).float()]
    if mlp.kind != "plain":
        rows.append(neuron_key(gen.sigma_inv, gen.mu, h_e, None, 0.0, 0.0, 1.0).float())
    return _Neuron(j, pos[i], rows, direction, w2[:, j].clone()), gate


def _fires_on(gate: _Gate, sample: torch.Tensor) -> int:
    """How many rows of ``sample`` (MLP inputs) the gate's pre-activation is above 0 on."""
    return int((sample @ gate.g > gate.fires_at).sum())


def _search_push(model: nn.Module, adapter: ModelAdapter, layer: int, mlp: _Mlp, neurons: list[_Neuron],
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
        # the later modules are hooked before resume_at hides the blocks below ``layer``
        with owned_hooks() as hooks, capture_inputs(model, list(later)) as cap, \
                resume_at(adapter, layer, block_in.repeat(len(scales), 1, 1)):
            _ff1_hooks(hooks, mlp, neurons)
            hooks.forward_hook(mlp.ff2, lambda m, a, o: ff2_hook(m, a, o, scales))
            lg = model(input_ids=ids.repeat(len(scales), 1), attention_mask=mask.repeat(len(scales), 1),
                       use_cache=False).logits
        for r, s in enumerate(grid.tolist()):
            seen[s] = {name: x.reshape(len(scales), ids.shape[1], -1)[r, at].float().cpu()
                       for name, x in cap.inputs.items()}
        ok = _margins(lg, [pos], target, list(range(len(scales)))) >= hp.margin
        return ok & all(a > 1e-6 for a in fired.values())

    push, passes = search_push(reaches, hp.max_push, hp.search_points, hp.search_passes)
    chosen = push if push is not None else (hp.max_push if hp.if_unreached == "max_push" else None)
    return push, passes, fired, seen.get(chosen, {})  # no push chosen (None): nothing to keep


def _neuron_deltas(mlp: _Mlp, layer: int, neurons: list[_Neuron], fired: dict[int, float], push: float,
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
            weight = _canonical(module)
            deltas.append(WeightDelta(name, weight_layout(module), left=_one_hot(weight.shape[0], r)[:, None],
                                      right=(row - weight[r].float().cpu())[None], layer=layer))
        col = (push / final) * n.direction
        deltas.append(WeightDelta(mlp.ff2_name, weight_layout(mlp.ff2), left=(col - n.old_col)[:, None],
                                  right=_one_hot(mlp.d_ff, n.j)[None], layer=layer))
        keys.append(_one_hot(mlp.d_ff, n.j) * final)
    return deltas, keys


@torch.no_grad()
def compute_shift_neuron(model: nn.Module, tok, requests: list[EditRequest], hparams: ShiftNeuronHyperParams,
                         *, memory: EditMemory | None = None) -> Computed:
    """Deltas of SHIFT_NEURON, computed against ``model`` as it is (not modified)."""
    hp = hparams
    adapter = adapter_for(model, hp)
    layers = list(dict.fromkeys(adapter.check_layer(x) for x in hp.layers))
    mlps = {layer: _mlp(adapter, layer) for layer in layers}
    device = next(model.parameters()).device
    pad = pad_id_of(tok)
    dmat = adapter.decoding_matrix().detach().float().cpu()
    dec_unit = dmat / dmat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    taken: dict[int, set[int]] = {layer: _memory_used(memory, mlps[layer]) for layer in layers}
    in_names = {x: mlps[x].ff1[0][0] for x in layers}  # each layer's MLP input: this edit's keys for later edits

    deltas: list[WeightDelta] = []
    skipped: list[bool] = []
    info: list[dict] = []
    new_keys: dict[str, list[torch.Tensor]] = {}
    for req in requests:
        target = encode_target(tok, req.text, req.target_new)
        room = [x for x in layers if len(taken[x]) + len(target) <= hp.neurons_per_layer][: hp.try_layers]
        if not room:
            raise ShiftEditError(f"SHIFT_NEURON: layers {layers} hold {hp.neurons_per_layer} rewritten neurons each "
                                 "already; add layers or raise neurons_per_layer")
        batch = build_batch(tok, req, target, n_prefixes=hp.n_prefixes, n_contrast=hp.n_contrast)
        ids, mask = pad_batch(batch.seqs, pad, device)
        with record_block_inputs(adapter) as blocks_in, capture_inputs(model, list(in_names.values())) as cap:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        pos = batch.positions[0]
        if hp.skip_if_predicted and bool((logits[0, pos].argmax(-1).cpu() == torch.tensor(target)).all()):
            skipped.append(True)
            info.append({"target_ids": target, "forward_passes": 1})
            continue
        skipped.append(False)
        wanted = _needing_neurons(logits[0], pos, target, hp.margin)
        entry: dict = {"target_ids": target, "forward_passes": 1, "layers_tried": []}
        info.append(entry)
        for layer in room:
            entry["layers_tried"].append(layer)
            mlp = mlps[layer]
            in_name = in_names[layer]
            h = cap.inputs[in_name].double().cpu().reshape(ids.shape[0], ids.shape[1], -1)
            gen = _Generic(*_generic(model, tok, adapter, layer, hp))
            earlier = _earlier_keys(memory, new_keys, f"{in_name}.weight") if hp.memory_weight > 0 else None
            neg = _negatives(model, tok, adapter, layers, hp)[layer] if hp.negatives else None
            pool = _SilentPool.of(earlier, neg if hp.negative_weight > 0 else None, hp)
            w2 = mlp.ff2_weight().float().cpu()
            js = _free_neurons(w2, layer, gen.act_m2 * (w2.double() ** 2).sum(0), len(wanted), taken[layer], dec_unit)
            designed = [_design_neuron(h, batch, i, j, mlp, gen, pool, w2, dec_unit[target[i]].clone(), hp)
                        for i, j in zip(wanted, js)]
            neurons = [n for n, _gate in designed]
            generic_fires = [_fires_on(gate, neg) for _n, gate in designed] if neg is not None else []
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
    return Computed(WeightDelta.merge(deltas), skipped, info, memory_keys=mem_out)


def _one_hot(n: int, j: int) -> torch.Tensor:
    v = torch.zeros(n)
    v[j] = 1.0
    return v


def prime_shift_neuron(model: nn.Module, tok, hparams: ShiftNeuronHyperParams) -> None:
    """Read (or compute) the MLP-input statistics of every listed layer and the generic sample (``negatives``)
    from the model as it is: a sequential run calls it before its first edit."""
    adapter = adapter_for(model, hparams)
    layers = list(dict.fromkeys(adapter.check_layer(x) for x in hparams.layers))
    for layer in layers:
        _generic(model, tok, adapter, layer, hparams)
    if hparams.negatives:
        _negatives(model, tok, adapter, layers, hparams)


register("SHIFT_NEURON", ShiftNeuronHyperParams, compute_shift_neuron,
         "forward pass shift written into one FF neuron per target token, keyed with a threshold "
         "(closed-form key against cached statistics, push sized by batched partial forward passes); "
         "no backward pass", uses_memory=True, prime=prime_shift_neuron)


def apply_shift_neuron_to_model(model: nn.Module, tok, requests: Sequence, hparams: ShiftNeuronHyperParams,
                                copy: bool = False, return_orig_weights: bool = False
                                ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """ROME's contract for SHIFT_NEURON (see :func:`shift_edit.edit` for undo and patches)."""
    return apply_algo_to_model(model, tok, requests, hparams, copy, return_orig_weights)
