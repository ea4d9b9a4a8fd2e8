"""ADAM baseline: the single step of :mod:`.sgd` taken by ``torch.optim.Adam``.

The optimiser state is fresh for every edit, so the first (and only) step is
``lr * g / (|g| + eps)`` elementwise, about ``lr * sign(g)``: the step size does not
scale with the gradient (the paper's limitations section discusses this).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...core.registry import Computed, register
from ...core.requests import EditRequest
from .training import (
    GradientHyperParams,
    batched_loss,
    dense_deltas,
    pad_id_of,
    select_matrices,
    split_skipped,
    training_session,
)


@dataclasses.dataclass(kw_only=True)
class AdamHyperParams(GradientHyperParams):
    """Hparams of the single Adam step (``betas``, ``eps`` as in ``torch.optim.Adam``)."""

    ALG_NAME = "ADAM"

    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def validate(self) -> None:
        super().validate()
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            self._fail("betas", self.betas, "two numbers in [0, 1)")
        if self.eps <= 0:
            self._fail("eps", self.eps, "it must be > 0")


def compute_adam(model: nn.Module, tok, requests: list[EditRequest], hparams: AdamHyperParams) -> Computed:
    """Deltas of one fresh Adam step, computed against ``model`` (weights left unchanged)."""
    matrices = select_matrices(model, hparams)
    skipped, pairs = split_skipped(model, tok, requests, hparams)
    info = [{"skipped": s} for s in skipped]
    if not pairs:
        return Computed([], skipped, info)
    with training_session(model, matrices) as originals:
        loss = batched_loss(model, pairs, pad_id_of(tok), hparams.target_tokens, hparams.batch_size, "sum")
        opt = torch.optim.Adam([m.param for m in matrices], lr=hparams.lr, betas=tuple(hparams.betas), eps=hparams.eps)
        opt.step()
        deltas = dense_deltas(matrices, originals)
    for row in info:
        row["loss_before"] = loss
    return Computed(deltas, skipped, info)


register("ADAM", AdamHyperParams, compute_adam,
         "one fresh Adam step (about lr * sign(grad)) on the chosen MLP matrices",
         linear_step=True)
