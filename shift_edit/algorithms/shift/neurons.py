"""The neuron machinery SHIFT_NEURON and SHIFT_SUBJECT share: one layer's MLP and how a neuron sits in it, the
MLP input's statistics on generic text (per process), the closed-form gate key that fires at an edit's keys and
stays silent on generic text and on given keys, the pool of keys a new gate must stay silent on (earlier edits,
a generic sample), which neurons are free, and the hooks that put new FF1 rows in place for a pass.

``hp`` arguments are the algorithms' hparams: any object with SHIFT_NEURON's gate fields (``threshold``,
``sharpness``, ``min_spreads``, ``max_threshold``, ``ridge``, ``memory_weight``, ``negatives``,
``negative_weight``, ``negative_reach``) and the statistics' ``mom2_*`` fields.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ...core.errors import ShiftEditError
from ...core.memory import EditMemory
from ...model.architectures import ModelAdapter, from_param_layout, weight_layout
from ...model.covariance import layer_stats
from ...model.generic_sample import generic_sample


# --- one layer's MLP -----------------------------------------------------------------------------
@dataclasses.dataclass
class Mlp:
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
        return canonical(self.ff2)

    def row(self, slot: int, j: int) -> tuple[nn.Module, str, int]:
        """(module, name, output row) of the neuron's gate (slot 0) or up (slot 1) row."""
        if self.kind == "gated":
            name, module = self.ff1[slot]
            return module, name, j
        name, module = self.ff1[0]
        return module, name, j + slot * self.d_ff


def canonical(module: nn.Module) -> torch.Tensor:
    """A projection's weight viewed as ``[out, in]`` (no copy)."""
    return from_param_layout(module.weight.detach(), weight_layout(module))


def mlp_of(adapter: ModelAdapter, layer: int) -> Mlp:
    names = adapter.ff1_names(layer)
    ff2_name = adapter.ff2_name(layer)
    ff2 = adapter.module(ff2_name)
    d_ff = int(canonical(ff2).shape[1])
    ff1 = [(n, adapter.module(n)) for n in names]
    outs = [int(canonical(m).shape[0]) for _n, m in ff1]
    if len(ff1) == 2 and outs == [d_ff, d_ff]:
        kind = "gated"
    elif len(ff1) == 1 and outs == [d_ff]:
        kind = "plain"
    elif len(ff1) == 1 and outs == [2 * d_ff]:
        kind = "fused"
    else:
        raise ShiftEditError(f"SHIFT_NEURON: cannot read the MLP of layer {layer} (FF1 {names} with outputs "
                             f"{outs}, FF2 input {d_ff})")
    mlp = Mlp(layer, kind, ff1, ff2_name, ff2, d_ff)
    if kind != "plain" and getattr(mlp.row(1, 0)[0], "bias", None) is not None:
        raise ShiftEditError(f"SHIFT_NEURON: gated MLPs with an up-projection bias are not supported (layer {layer})")
    return mlp


# --- statistics, per process ---------------------------------------------------------------------
#: (μ, Σ⁻¹, E[x_j²]) per model object, then per (layer, statistics settings): read once per process, so
#: later calls on an edited model neither fingerprint it nor reload the statistics (weakly keyed: a new
#: model object never sees another's statistics, even one that reuses a freed model's id)
_GENERIC: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple]]" = weakref.WeakKeyDictionary()


def generic_stats(model: nn.Module, tok, adapter: ModelAdapter, layer: int, hp
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(μ, Σ⁻¹, E[x_j²], Σ)`` (float64): the MLP input's mean and inverse (ridged) covariance on generic text,
    the second moment of each neuron's activation (FF2's input), and the covariance itself (no ridge)."""
    return prime_generic_stats(model, tok, adapter, [layer], hp)[layer]


def prime_generic_stats(model: nn.Module, tok, adapter: ModelAdapter, layers: Sequence[int], hp
                        ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`generic_stats` of several layers; the layers missing from the cache are computed together (one pass
    over the corpus per site instead of two per layer)."""
    cache = _GENERIC.setdefault(model, {})
    settings = (hp.ridge, hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_max_length, hp.mom2_dtype)
    todo = [x for x in dict.fromkeys(layers) if (x, *settings) not in cache]
    if todo:
        common = dict(corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens, max_length=hp.mom2_max_length,
                      dtype=hp.mom2_dtype, adapter=adapter, progress=len(todo) > 1)
        inputs_of = layer_stats(model, tok, todo, site="ff1", **common)
        ff2_of = layer_stats(model, tok, todo, **common)
    for layer in todo:
        inputs, ff2, key = inputs_of[layer], ff2_of[layer], (layer, *settings)
        mu = inputs.mean.double()
        sigma = inputs.mom2.double() - torch.outer(mu, mu)
        sigma = (sigma + sigma.T) / 2
        ridge = hp.ridge * float(torch.diagonal(sigma).mean()) + 1e-12
        ridged = sigma + ridge * torch.eye(len(mu), dtype=torch.float64)
        cache[key] = (mu, torch.linalg.inv(ridged), torch.diagonal(ff2.mom2).double().clone(), sigma)
    return {layer: cache[(layer, *settings)] for layer in layers}


#: MLP inputs of generic tokens per model object and (layers, settings) (see ``negatives``)
_NEGATIVES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, dict[int, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def generic_keys(model: nn.Module, tok, adapter: ModelAdapter, layers: list[int], hp
               ) -> dict[int, torch.Tensor]:
    """``hp.negatives`` generic tokens' MLP inputs at each layer (``[n, d]``, repeats dropped): the statistics corpus's
    texts after those whose tokens the statistics read (:func:`~shift_edit.model.generic_sample.generic_sample`).
    Held in the sample's own dtype (float32: half the memory of float64, 46 MB per layer for 20,000 tokens of
    SmolLM2) and widened to float64 where used, which is exact."""
    cache = _NEGATIVES.setdefault(model, {})
    key = (tuple(layers), hp.negatives, hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_max_length)
    if key not in cache:
        sample = generic_sample(model, tok, layers, corpus=hp.mom2_corpus, skip_tokens=hp.mom2_n_tokens,
                                n_tokens=hp.negatives, max_length=hp.mom2_max_length, adapter=adapter)
        # repeats: no new key; one layer at a time, each raw sample freed once its rows are kept (peak memory)
        cache[key] = {layer: torch.unique(sample.pop(layer), dim=0) for layer in list(sample)}
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


def neuron_rows(mlp: Mlp, gen: "GenericView", h_e: torch.Tensor, silent: torch.Tensor, weights: torch.Tensor,
                bias: float, pool: "SilentPool | None", hp) -> tuple[list[torch.Tensor], "Gate"]:
    """A new neuron's FF1 rows (float32, canonical): the gate row ``α g`` firing at the edit keys ``h_e`` (one
    or more rows) and silent on ``silent`` (weights ``weights``) and, via ``pool``, on the pooled keys it would
    nearly fire on (up to :data:`ACTIVE_ROUNDS` solves, an active set); for gated MLPs also an up row with
    ``u·h = 1`` at every edit key and ``u·μ = 1``. Returns the rows and the gate."""
    gate = gate_key(gen.sigma_inv, gen.sigma, gen.mu, h_e, silent if len(silent) else None, weights, bias, hp)
    active = torch.zeros(0, dtype=torch.long)
    for _round in range(ACTIVE_ROUNDS if pool is not None else 0):
        new = pool.risky(gate, active)
        if not len(new):
            break
        active = torch.cat([active, new])
        gate = gate_key(gen.sigma_inv, gen.sigma, gen.mu, h_e, torch.cat([silent, pool.keys[active]]),
                        torch.cat([weights, pool.weights[active]]), bias, hp)
    rows = [(gate.sharpness * gate.g).float()]
    if mlp.kind != "plain":
        rows.append(neuron_key(gen.sigma_inv, gen.mu, h_e, None, 0.0, 0.0, 1.0).float())
    return rows, gate


#: solves of the gate key that add the pooled keys it would fire on (an active set)
ACTIVE_ROUNDS = 3

#: the thresholds ``β`` tried (between ``threshold`` and ``max_threshold``) when ``min_spreads`` is set
_THRESHOLD_GRID = 24


@dataclasses.dataclass
class Gate:
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
             silent: torch.Tensor | None, w_c: float | torch.Tensor, bias: float, hp) -> Gate:
    """The gate key for ``hp.threshold``, or with ``hp.min_spreads`` the smallest ``β`` on a grid up to
    ``hp.max_threshold`` whose firing point sits ``min_spreads`` generic spreads above the mean (``α`` scaled
    so that the edit's pre-activation stays ``α(1 - threshold)``). ``bias``: the row's existing FF1 bias."""
    def spreads(g: torch.Tensor, beta: float) -> float:
        return beta / math.sqrt(max(float(g @ sigma @ g), 1e-30))

    if hp.min_spreads is None:
        g = neuron_key(sigma_inv, mu, h_e, silent, w_c, 1.0, -hp.threshold - bias / hp.sharpness)
        return Gate(g, hp.sharpness, hp.threshold, spreads(g, hp.threshold), bias)
    edit_pre = hp.sharpness * (1 - hp.threshold)
    # the key is linear in its value at the mean: g(c) = g_1 + c g_0 (one solve each)
    g1 = neuron_key(sigma_inv, mu, h_e, silent, w_c, 1.0, 0.0)
    g0 = neuron_key(sigma_inv, mu, h_e, silent, w_c, 0.0, 1.0)
    best: Gate | None = None
    for beta in torch.linspace(hp.threshold, hp.max_threshold, _THRESHOLD_GRID, dtype=torch.float64).tolist():
        alpha = edit_pre / (1 - beta)
        g = g1 + (-beta - bias / alpha) * g0
        gate = Gate(g, alpha, beta, spreads(g, beta), bias)
        if gate.spreads >= hp.min_spreads:
            return gate
        best = gate if best is None or gate.spreads > best.spreads else best
    return best


@dataclasses.dataclass
class SilentPool:
    """Keys a new gate key may have to be silent on: earlier edits' MLP inputs, then generic sample tokens."""

    keys: torch.Tensor  # [n, d] float64
    weights: torch.Tensor  # [n]: memory_weight, then negative_weight
    reach: torch.Tensor  # [n]: the fraction of the threshold within which a key joins the silent set

    @classmethod
    def of(cls, earlier: torch.Tensor | None, negatives: torch.Tensor | None, hp
           ) -> "SilentPool | None":
        parts = [(x, w, r) for x, w, r in ((earlier, hp.memory_weight, 0.5),
                                           (negatives, hp.negative_weight, hp.negative_reach)) if x is not None]
        if not parts:
            return None

        def per_key(value: float, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x),), value, dtype=torch.float64)

        return cls(torch.cat([x.double() for x, _w, _r in parts]), torch.cat([per_key(w, x) for x, w, _r in parts]),
                   torch.cat([per_key(r, x) for x, _w, r in parts]))

    def risky(self, gate: Gate, active: torch.Tensor) -> torch.Tensor:
        """Indices not yet in ``active`` whose gate pre-activation is within their reach of firing."""
        near = ((self.keys @ gate.g) > gate.fires_at - gate.threshold * self.reach).nonzero()[:, 0]
        return near[~torch.isin(near, active)]


# --- which neurons are free ------------------------------------------------------------------------
def earlier_keys(memory: EditMemory | None, new_keys: dict[str, list[torch.Tensor]], param: str
                  ) -> torch.Tensor | None:
    """The MLP inputs at earlier edits' positions for ``param`` (memory, then this call's), float64."""
    rows = [memory.keys(param)] if memory is not None and memory.keys(param) is not None else []
    rows += [torch.stack(new_keys[param])] if new_keys.get(param) else []
    return torch.cat(rows).double() if rows else None


def memory_used(memory: EditMemory | None, mlp: Mlp) -> set[int]:
    keys = memory.keys(mlp.ff2_param) if memory is not None else None
    if keys is None or not len(keys) or keys.shape[1] != mlp.d_ff:
        return set()
    return {int(j) for j in keys.abs().argmax(1)}


@dataclasses.dataclass(frozen=True)
class DecodingUnits:
    """The decoding matrix's rows scaled to unit norm, without a second copy of the matrix: ``matrix`` is the
    model's own (float32 on CPU: no copy; another dtype or device: one float32 CPU copy) and ``norms`` its row norms.
    ``units[t]`` is row ``t`` over its norm (the same bits as dividing the whole matrix by its row norms)."""

    matrix: torch.Tensor  # [vocab, d]
    norms: torch.Tensor  # [vocab]

    def __getitem__(self, t: int) -> torch.Tensor:
        return self.matrix[t] / self.norms[t]

    def written(self, col: torch.Tensor) -> bool:
        """Is this FF2 column a multiple of a decoding row (a neuron this algorithm wrote)?"""
        n = float(col.norm())
        return n > 0 and float(((self.matrix @ (col / n)) / self.norms).abs().max()) > 0.9999


#: per model: (the decoding matrix's data pointer, its version counter, its unit rows)
_DEC_UNITS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, int, DecodingUnits]]" = weakref.WeakKeyDictionary()


def decoding_units(adapter: ModelAdapter) -> DecodingUnits:
    """The decoding matrix's unit rows (float32, CPU), its row norms computed once per model and again only when
    the matrix changes (an in-place update bumps its version counter)."""
    weight = adapter.decoding_matrix()
    key = (weight.data_ptr(), weight._version)
    hit = _DEC_UNITS.get(adapter.model)
    if hit is not None and hit[:2] == key:
        return hit[2]
    dmat = weight.detach().float().cpu()
    unit = DecodingUnits(dmat, dmat.norm(dim=-1).clamp_min(1e-12))
    _DEC_UNITS[adapter.model] = (*key, unit)
    return unit


def free_neurons(w2: torch.Tensor, layer: int, cost: torch.Tensor, n: int, exclude: set[int],
                  dec_unit: DecodingUnits) -> list[int]:
    """The ``n`` cheapest neurons not in ``exclude`` whose FF2 column (``w2``: ``[d_model, d_ff]``) this
    algorithm did not write."""
    out: list[int] = []
    for j in (int(x) for x in cost.argsort()):
        if j in exclude or dec_unit.written(w2[:, j]):
            continue
        out.append(j)
        if len(out) == n:
            return out
    raise ShiftEditError(f"SHIFT_NEURON: layer {layer} has no free neuron left; add layers")


# --- the search with the new neurons in place ----------------------------------------------------------
@dataclasses.dataclass
class Neuron:
    j: int
    pos: int  # the prompt position it fires at
    rows: list[torch.Tensor]  # [gate row (α g)] or [gate row, up row u] (float32, canonical)
    direction: torch.Tensor  # D̂[t] (float32)
    old_col: torch.Tensor  # FF2[:, j] before the edit (float32)


def ff1_hooks(hooks, mlp: Mlp, neurons: list[Neuron]) -> None:
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
class GenericView:
    """A layer's generic-text view: MLP-input mean, Σ⁻¹, E[x²] of the FF neurons, Σ (:func:`generic_stats`)."""

    mu: torch.Tensor
    sigma_inv: torch.Tensor
    act_m2: torch.Tensor
    sigma: torch.Tensor


def gate_bias(mlp: Mlp, j: int) -> float:
    """Neuron ``j``'s existing gate (FF1) bias, 0 without one."""
    module, _name, r = mlp.row(0, j)
    bias = getattr(module, "bias", None)
    return float(bias.detach()[r]) if bias is not None else 0.0


def fires_on(gate: Gate, sample: torch.Tensor) -> int:
    """How many rows of ``sample`` (MLP inputs) the gate's pre-activation is above 0 on (float64 products: the rows
    are widened a block at a time, the same bits as widening all at once and far faster than allocating it)."""
    if not len(sample):
        return 0
    block = torch.empty(min(len(sample), 2048), sample.shape[-1], dtype=torch.float64)
    fires = 0
    for start in range(0, len(sample), len(block)):
        rows = block[: len(sample) - start] if start + len(block) > len(sample) else block
        rows.copy_(sample[start : start + len(rows)])
        fires += int((torch.mv(rows, gate.g) > gate.fires_at).sum())
    return fires


def one_hot(n: int, j: int) -> torch.Tensor:
    v = torch.zeros(n)
    v[j] = 1.0
    return v


@dataclasses.dataclass(kw_only=True)
class NeuronFields:
    """The gate, capacity and generic-sample fields SHIFT_NEURON's and SHIFT_SUBJECT's hparams share (each class
    documents them; SHIFT_SUBJECT changes two defaults), checked by :func:`validate_neuron_fields`."""

    neurons_per_layer: int = 256
    try_layers: int = 1
    threshold: float = 0.7
    sharpness: float = 25.0
    min_spreads: float | None = None
    max_threshold: float = 0.95
    activation: float = 8.0
    n_contrast: int = 16
    contrast_weight: float = 1000.0
    memory_weight: float = 1000.0
    negatives: int = 0
    negative_weight: float = 1000.0
    negative_reach: float = 0.5
    max_generic_fires: int | None = None
    ridge: float = 0.01


def validate_neuron_fields(hp) -> None:
    """The checks SHIFT_NEURON's and SHIFT_SUBJECT's hparams share (the gate, the generic sample, the capacity and
    the layers tried); ``hp.validate`` calls it, which raises through ``hp._fail`` on the first bad field."""
    if not (math.isfinite(hp.threshold) and 0 <= hp.threshold < 1):
        hp._fail("threshold", hp.threshold, "it must be in [0, 1)")
    hp._require_finite("sharpness", "activation", positive=True)
    if hp.min_spreads is not None:
        hp._require_finite("min_spreads", positive=True)
        if not (math.isfinite(hp.max_threshold) and hp.threshold <= hp.max_threshold < 1):
            hp._fail("max_threshold", hp.max_threshold, "it must be in [threshold, 1)")
    hp._require_finite("contrast_weight", "memory_weight", "negative_weight", "ridge")
    if hp.negatives < 0:
        hp._fail("negatives", hp.negatives, "it must be >= 0")
    if hp.max_generic_fires is not None and (hp.max_generic_fires < 0 or not hp.negatives):
        hp._fail("max_generic_fires", hp.max_generic_fires, "it must be >= 0, with negatives > 0")
    if not (math.isfinite(hp.negative_reach) and 0 < hp.negative_reach <= 1):
        hp._fail("negative_reach", hp.negative_reach, "it must be in (0, 1]")
    if hp.neurons_per_layer < 1:
        hp._fail("neurons_per_layer", hp.neurons_per_layer, "it must be >= 1")
    if not 1 <= hp.try_layers <= len(hp.layers):
        hp._fail("try_layers", hp.try_layers, f"it must be in [1, {len(hp.layers)}] (the listed layers)")


def neuron_tags(hp: Mapping[str, Any]) -> list[str]:
    """Run tags of the neuron algorithms' capacity, screen and retries: ``x225 screen 30 try 5``."""
    bits = [f"x{hp['neurons_per_layer']}"] if hp.get("neurons_per_layer") is not None else []
    if hp.get("max_generic_fires") is not None:
        bits.append(f"screen {hp['max_generic_fires']}")
    if (hp.get("try_layers") or 1) > 1:
        bits.append(f"try {hp['try_layers']}")
    return bits
