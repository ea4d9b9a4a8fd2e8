"""FT baseline: multi-step fine-tuning of the chosen MLP matrices on the edit prompts.

Every step backpropagates the mean target NLL over the requests (all target tokens
by default, teacher forced) and takes an optimiser step (Adam, as in ROME's FT; plain
SGD as an option); training stops early once the loss is below ``early_stop_nll``.
The delta is the trained weight minus the original; the original is then restored.
:mod:`.ft_l` adds ROME's L-infinity norm constraint (FT-L).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ...core.registry import Computed, register
from ...core.requests import EditRequest
from ..common import adapter_for
from .training import (
    FrozenPrefix,
    GradientHyperParams,
    TrainedMatrix,
    batched_loss,
    dense_deltas,
    pad_id_of,
    select_matrices,
    split_skipped,
    training_session,
)


@dataclasses.dataclass(kw_only=True)
class FTHyperParams(GradientHyperParams):
    """Hparams of fine-tuning.

    Attributes:
        steps: the most optimiser steps.
        weight_decay: the optimiser's weight decay.
        early_stop_nll: stop once the mean target NLL is below this (ROME's FT: 1e-2).
        optimizer: ``"adam"`` (ROME's FT) or ``"sgd"``.
        seed: seeds torch before training (the result is deterministic anyway on CPU).
    """

    ALG_NAME = "FT"

    target_tokens: Literal["first", "all"] = "all"
    steps: int = 25
    weight_decay: float = 0.0
    early_stop_nll: float = 1e-2
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            self._fail("steps", self.steps, "it must be >= 1")
        if self.weight_decay < 0:
            self._fail("weight_decay", self.weight_decay, "it must be >= 0")
        if self.early_stop_nll < 0:
            self._fail("early_stop_nll", self.early_stop_nll, "it must be >= 0")


def finetune(
    model: nn.Module, tok, requests: list[EditRequest], hparams: FTHyperParams, epsilon: float | None = None,
    *, frozen_prefix: bool = True,
) -> Computed:
    """Fine-tune, read off the deltas and restore the weights; ``epsilon`` boxes each weight.

    With ``frozen_prefix`` (and more than one step), the blocks below the lowest trained layer run once and every
    step re-runs only the blocks from that layer (:class:`~.gradient.FrozenPrefix`, checked against a full pass at
    the first step): the same deltas, at ``(n_layers - layer) / n_layers`` of the forward passes' cost."""
    matrices: list[TrainedMatrix] = select_matrices(model, hparams)
    skipped, pairs = split_skipped(model, tok, requests, hparams)
    info = [{"skipped": s} for s in skipped]
    if not pairs:
        return Computed([], skipped, info)
    torch.manual_seed(hparams.seed)
    params = [m.param for m in matrices]
    pad = pad_id_of(tok)
    lowest = min(m.layer for m in matrices)
    with training_session(model, matrices) as originals:
        prefix = None
        if frozen_prefix and hparams.steps > 1 and lowest > 0:
            prefix = FrozenPrefix(model, adapter_for(model, hparams), lowest, pairs, pad, hparams.target_tokens,
                                  hparams.batch_size)
        if hparams.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
        losses, taken = [], 0
        for step in range(hparams.steps):
            opt.zero_grad(set_to_none=True)
            loss = batched_loss(model, pairs, pad, hparams.target_tokens, hparams.batch_size, "mean", prefix=prefix)
            if step == 0 and prefix is not None and not prefix.verify(loss):
                opt.zero_grad(set_to_none=True)
                loss = batched_loss(model, pairs, pad, hparams.target_tokens, hparams.batch_size, "mean")
            losses.append(loss)
            if loss < hparams.early_stop_nll:
                break
            opt.step()
            taken += 1
            if epsilon is not None:
                with torch.no_grad():
                    for m in matrices:
                        orig = originals[m.module]
                        m.param.copy_(torch.minimum(torch.maximum(m.param, orig - epsilon), orig + epsilon))
        deltas = dense_deltas(matrices, originals)
    for row in info:
        row.update({"steps": taken, "loss_first": losses[0], "loss_last": losses[-1]})
    return Computed(deltas, skipped, info)


def compute_ft(model: nn.Module, tok, requests: list[EditRequest], hparams: FTHyperParams) -> Computed:
    """Deltas of unconstrained fine-tuning, computed against ``model`` (weights left unchanged)."""
    return finetune(model, tok, requests, hparams)


register("FT", FTHyperParams, compute_ft,
         "fine-tuning of the chosen MLP matrices on the edit prompts (Adam, early stop)")
