"""SGD baseline (paper appendix G.1): one backward pass, one plain gradient step.

The loss is the new target's NLL at the last prompt position (first target token;
all target tokens as an option), summed over requests. The delta of each chosen
matrix is ``-lr * grad``. With ``grad_positions="target"`` the gradient reaches the
weights only through the position(s) that predict the target, so for FF2 and one
token it is the rank-one ``δ_n x_nᵀ`` of the paper's decomposition (``x_n`` FF2's
input at the last prompt token, ``δ_n`` the gradient of the loss w.r.t. FF2's output
there); with ``"all"`` (default) it is the full gradient, summed over every position.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from ...core.registry import Computed, register
from ...core.requests import EditRequest
from .training import (
    GradientHyperParams,
    batched_loss,
    grad_deltas,
    pad_id_of,
    select_matrices,
    split_skipped,
    training_session,
)


@dataclasses.dataclass(kw_only=True)
class SGDHyperParams(GradientHyperParams):
    """Hparams of the single SGD step.

    Attributes:
        grad_positions: ``"all"`` (the true gradient) or ``"target"`` (only the terms of
            the position(s) that predict the target: ``Σ δ_i x_iᵀ`` over those positions).
    """

    ALG_NAME = "SGD"

    grad_positions: Literal["all", "target"] = "all"


def compute_sgd(model: nn.Module, tok, requests: list[EditRequest], hparams: SGDHyperParams) -> Computed:
    """Deltas ``-lr * grad`` computed against ``model`` as it is (weights left unchanged)."""
    matrices = select_matrices(model, hparams)
    skipped, pairs = split_skipped(model, tok, requests, hparams)
    info = [{"skipped": s} for s in skipped]
    if not pairs:
        return Computed([], skipped, info)
    only = [model.get_submodule(m.module) for m in matrices] if hparams.grad_positions == "target" else ()
    with training_session(model, matrices):
        loss = batched_loss(model, pairs, pad_id_of(tok), hparams.target_tokens, hparams.batch_size, "sum", only)
        deltas = grad_deltas(matrices, -hparams.lr)
    for row in info:
        row["loss_before"] = loss
    return Computed(deltas, skipped, info)


register("SGD", SGDHyperParams, compute_sgd, "one plain gradient step of the target NLL on the chosen MLP matrices",
         linear_step=True)
