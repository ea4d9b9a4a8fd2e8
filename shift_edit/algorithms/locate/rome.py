"""ROME: rank-one model editing (Meng et al., 2022, "Locating and Editing Factual
Associations in GPT"), written for this harness from the paper.

For one request at FF2 of layer ``l`` (the MLP output matrix, canonical ``W: [out, in]``):

1. Context templates: short texts sampled from the model itself (seeded, top-k 5) after
   the prefixes "The", "Therefore", "Because", "I", "You", each followed by ". " and the
   prompt. ``context_template_length_params: [[5, 10], [10, 10]]`` (the published ROME
   setting) means 10 generations of 5 tokens and 10 of 10 tokens, plus the bare prompt
   ``"{}"``: 21 contexts. A length counts the prefix's tokens too (``context_length_mode:
   total``, the reference code's ``generate_fast(max_out_len=...)``); see
   :class:`~shift_edit.algorithms.locate.zstar.ReferenceLocateEditHyperParams` for this and the other reference
   semantics.
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
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ...core.deltas import WeightDelta, put_back
from ...core.registry import Computed, register, tag_layers, tag_statistics
from ...core.requests import EditRequest
from ...model.covariance import SecondMoment, layer_stats
from ..common import adapter_for, already_predicted
from .contexts import prime_context_templates, templates_for
from .locate_hparams import ReferenceLocateEditHyperParams, reference_tags
from .zstar import add_canonical_, lambda_key_vector, optimise_delta

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class ROMEHyperParams(ReferenceLocateEditHyperParams):
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


def describe_rome(hp: Mapping[str, Any]) -> list[str]:
    """Run tags: the layer, the statistics, ``through-update`` and the key that scales Λ (runs from before the
    ``lambda_key`` option used the mean)."""
    return (tag_layers(hp) + tag_statistics(hp) + (["through-update"] if hp.get("optimise_through_update") else [])
            + ([f"Λ-key {hp['lambda_key']}"] if hp.get("lambda_key") else []) + reference_tags(hp))


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
    templates = templates_for(model, tok, hparams)
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
         "rank-one model editing (Meng et al. 2022): covariance-adjusted rank-one FF2 update, v* by optimisation",
         prime=prime_context_templates, describe=describe_rome)
