"""MEMIT: mass-editing memory in a transformer (Meng et al., 2023), written from the paper.

For a batch of N requests and edited layers ``l_1 < ... < l_L``:

1. ``z*_i``: for each request, δ_i is optimised at FF2's output of the last edited layer
   (adding to FF2's output there is adding to the residual stream ``h^L``), with the same
   loss as ROME's v* but clamped relative to the residual ``||h^L||``;
   ``z*_i = h^L_i + δ_i`` at the fact token of the bare prompt.
2. For each edited layer ``l_j`` in order: keys ``K = [k_1 .. k_N]`` (FF2 inputs at the fact
   token, averaged within each context type and then across types as MEMIT's code does (``key_average``),
   with the lower layers already edited),
   the remaining residual ``R = (z* - h^L) / (L - j + 1)`` (``h^L`` recomputed with the
   lower layers edited), and, in float64,
   ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (``λ = mom2_update_weight``, ``C = E[k kᵀ]``), stored as the
   factors ``left = R [out, N]``, ``right = ((λ C + K Kᵀ)⁻¹ K)ᵀ [N, in]``: rank ≤ N.

The weights are changed while computing (each layer's update is needed for the next)
and restored before returning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...core.errors import ShiftEditError
from ...core.registry import Computed, register, tag_layers, tag_statistics, tag_value
from ...core.requests import EditRequest
from ...model.covariance import layer_stats
from ..common import adapter_for, already_predicted
from .contexts import prime_context_templates, templates_for
from .locate_hparams import ZStarHyperParams, reference_tags
from .spread import key_groups, spread_over_layers
from .zstar import request_info, target_zs

log = logging.getLogger(__name__)


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


def describe_memit(hp: Mapping[str, Any]) -> list[str]:
    """Run tags: the layers, λ (``mom2_update_weight``), the statistics and the earlier semantics if chosen."""
    return tag_layers(hp) + tag_value(hp, "mom2_update_weight", "λ") + tag_statistics(hp) + reference_tags(hp)


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
    templates = templates_for(model, tok, hparams)
    z, z_info = target_zs(model, tok, adapter, z_layer, active, templates, hparams)

    def solve(layer: int, K: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        C = covs[layer] if layer in covs else torch.eye(K.shape[0], dtype=torch.float64)
        adj = torch.linalg.solve(hparams.mom2_update_weight * C + K @ K.T, K)  # [in, N]
        return resid, adj.T, {}

    deltas, layer_info, _keys = spread_over_layers(model, tok, adapter, layers, z, active, templates,
                                                   hparams.fact_token, solve, key_groups(hparams))
    return Computed(deltas, skipped, request_info(skipped, z_info, layer_info))


register("MEMIT", MEMITHyperParams, compute_memit,
         "mass-editing memory (Meng et al. 2023): batch edits spread over several layers, rank <= N per layer",
         prime=prime_context_templates, describe=describe_memit)
