"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025), written from the paper.

AlphaEdit is MEMIT with the update projected onto the null space of the preserved keys:

1. ``P``: with ``K0 K0ᵀ ∝ C = E[k kᵀ]`` (the FF2-input second moment ROME and MEMIT already use,
   :mod:`shift_edit.model.covariance`, of the unedited model), ``P = Û Ûᵀ`` where ``Û`` are the eigenvectors
   of ``C`` whose eigenvalues are below ``nullspace_threshold`` (the paper: 2e-2). Any ``Δ P``
   leaves every preserved key's output unchanged: ``Δ P K0 ≈ 0``.
2. ``z*`` of each request exactly as MEMIT (:func:`~shift_edit.algorithms.locate.memit.target_zs`), and the
   residual ``R = (z* - h^L) / (L - j + 1)`` spread over the edited layers ``l_1 < ... < l_L``.
3. For each layer in order, with ``K1`` the keys of this batch (context-averaged FF2 inputs at the
   fact token, lower layers already edited) and ``Kp`` the keys of earlier edits (the run's
   :class:`~shift_edit.core.memory.EditMemory`):
   ``Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ I)⁻¹`` (``λ`` = ``L2``), the minimiser of
   ``||Δ P K1 - R||² + ||Δ P Kp||² + λ ||Δ P||²``; it is stored as factors
   ``left = R [out, N]``, ``right = ((P (K1 K1ᵀ + Kp Kpᵀ) + λ I)⁻¹ P K1)ᵀ [N, in]`` (rank ≤ N).

For a key ``k0`` with ``P k0 = 0``, ``(K Kᵀ P + λ I) k0 = λ k0``, so ``Δ k0 = R K1ᵀ P k0 / λ = 0``
exactly: the preserved keys' outputs do not move, whatever the batch or the memory.
The weights are changed while computing (each layer's update is needed for the next) and
restored before returning; this batch's keys are returned in ``Computed.memory_keys``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...core.errors import ShiftEditError
from ...core.memory import EditMemory
from ...core.registry import Computed, describe_basics, register
from ...core.requests import EditRequest
from ...model.covariance import SecondMoment, layer_stats
from ..common import adapter_for, already_predicted
from .contexts import prime_context_templates, templates_for
from .locate_hparams import ZStarHyperParams, reference_tags
from .spread import key_groups, spread_over_layers
from .zstar import request_info, target_zs

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class AlphaEditHyperParams(ZStarHyperParams):
    """Hparams of AlphaEdit (the z* fields are MEMIT's).

    Attributes:
        nullspace_threshold: eigenvalues of ``C = E[k kᵀ]`` below this span the null space
            (absolute, as in the paper's code: 2e-2 for GPT2-XL, GPT-J and Llama3-8B).
        L2: ``λ``, the ridge weight of ``||Δ P||²``.
        clamp_norm_factor / context_template_length_params: as MEMIT (``0.75``, ``[[10, 5]]``).
        context_length_mode / v_step_count / key_average: the reference semantics by default, as MEMIT
            (:class:`~shift_edit.algorithms.locate.zstar.ZStarHyperParams`; AlphaEdit's code is MEMIT's there).
        zstar_cache: reuse each request's ``z*`` from disk (shared with MEMIT; see its hparams).
    """

    ALG_NAME = "AlphaEdit"

    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    def validate(self) -> None:
        super().validate()
        if not self.nullspace_threshold > 0:
            self._fail("nullspace_threshold", self.nullspace_threshold, "it must be > 0")
        if not self.L2 > 0:
            self._fail("L2", self.L2, "it must be > 0 (the solve needs the ridge term)")


#: (statistics sha256 or id, threshold) -> (P float64 [d, d], null-space dimension); bounded
_PROJECTORS: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()


def null_space_projector(stats: SecondMoment | torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """``P = Û Ûᵀ`` (float64, CPU) over the eigenvectors of ``C`` with eigenvalue < ``threshold``,
    and the null space's dimension. Cached per statistics file and threshold."""
    mom2 = stats.mom2 if isinstance(stats, SecondMoment) else stats
    key = ((stats.meta.get("sha256") or id(stats)) if isinstance(stats, SecondMoment) else None, float(threshold))
    if key[0] is not None and key in _PROJECTORS:
        _PROJECTORS.move_to_end(key)
        return _PROJECTORS[key]
    c = mom2.double().cpu()
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    basis = evecs[:, evals < threshold]
    out = (basis @ basis.T, int(basis.shape[1]))
    if key[0] is not None:
        _PROJECTORS[key] = out
        while len(_PROJECTORS) > 16:
            _PROJECTORS.popitem(last=False)
    return out


def alphaedit_factors(
    resid: torch.Tensor, k1: torch.Tensor, proj: torch.Tensor, l2: float, kp: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form update as factors ``(left [out, N], right [N, in])``, float64.

    Args:
        resid: ``R`` ``[out, N]``; k1: this batch's keys ``[in, N]``; proj: ``P`` ``[in, in]``;
        l2: ``λ``; kp: earlier edits' keys ``[in, n_p]`` or ``None``.
    """
    k1 = k1.double()
    gram = k1 @ k1.T
    if kp is not None and kp.numel():
        kp = kp.double()
        gram = gram + kp @ kp.T
    a = proj @ gram + l2 * torch.eye(proj.shape[0], dtype=torch.float64)
    x = torch.linalg.solve(a, proj @ k1)  # [in, N]
    return resid.double(), x.T


def compute_alphaedit(
    model: nn.Module, tok, requests: list[EditRequest], hparams: AlphaEditHyperParams, *,
    memory: EditMemory | None = None,
) -> Computed:
    """AlphaEdit's per-layer factors for a batch, computed against ``model`` and ``memory``."""
    adapter = adapter_for(model, hparams)
    layers = sorted({adapter.check_layer(layer) for layer in hparams.layers})
    if layers[-1] >= adapter.n_layers - 1:
        raise ShiftEditError(
            f"AlphaEdit cannot edit the model's last layer ({layers[-1]}): z* is read from the residual after it")
    z_layer = layers[-1]
    skipped = already_predicted(model, tok, requests) if hparams.skip_if_predicted else [False] * len(requests)
    active = [r for r, s in zip(requests, skipped) if not s]
    if not active:
        return Computed([], skipped, [{} for _ in requests])
    stats = layer_stats(model, tok, layers, corpus=hparams.mom2_corpus, n_tokens=hparams.mom2_n_tokens,
                        max_length=hparams.mom2_max_length, dtype=hparams.mom2_dtype, adapter=adapter)
    projs = {layer: null_space_projector(stats[layer], hparams.nullspace_threshold) for layer in layers}
    for layer, (_p, dim) in projs.items():
        if dim == 0:
            raise ShiftEditError(
                f"AlphaEdit: no eigenvalue of layer {layer}'s key second moment is below nullspace_threshold "
                f"{hparams.nullspace_threshold:g} "
                f"(smallest {float(torch.linalg.eigvalsh(stats[layer].mom2.double())[0]):.3g}); "
                "raise the threshold"
            )
    templates = templates_for(model, tok, hparams)
    z, z_info = target_zs(model, tok, adapter, z_layer, active, templates, hparams)

    def solve(layer: int, k1: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        kp = memory.keys(param_of(layer)) if memory is not None else None
        proj, dim = projs[layer]
        left, right = alphaedit_factors(resid, k1, proj, hparams.L2, None if kp is None else kp.T)
        return left, right, {"null_space_dim": dim, "memory_keys": 0 if kp is None else int(kp.shape[0])}

    def param_of(layer: int) -> str:
        return f"{adapter.ff2_name(layer)}.weight"

    deltas, layer_info, keys = spread_over_layers(model, tok, adapter, layers, z, active, templates,
                                                  hparams.fact_token, solve, key_groups(hparams))
    return Computed(deltas, skipped, request_info(skipped, z_info, layer_info),
                    memory_keys={param_of(layer): k for layer, k in keys.items()})


def describe_alphaedit(hp: Mapping[str, Any]) -> list[str]:
    """Run tags: the layers, the statistics and the earlier semantics if chosen."""
    return describe_basics(None)(hp) + reference_tags(hp)


register("AlphaEdit", AlphaEditHyperParams, compute_alphaedit,
         "null-space constrained editing (Fang et al. 2025): MEMIT's update projected onto the null space of the "
         "preserved keys, earlier edits' keys kept (lifelong editing)", uses_memory=True,
         prime=prime_context_templates,
         describe=describe_alphaedit)
