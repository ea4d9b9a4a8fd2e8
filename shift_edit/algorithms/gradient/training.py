"""Shared machinery of the gradient baselines (SGD, ADAM, FT, FT_L).

Each baseline trains a few weight matrices of the model in place and then puts
them back: :func:`training_session` selects the matrices, makes only them require
gradients, and on exit copies the original tensors back bit for bit (the
``nn.Parameter`` objects are never replaced) and restores every parameter's
``requires_grad`` and ``.grad`` as they were. The loss is the negative
log-likelihood of the new target at the position(s) that predict it, computed in
one right-padded batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...core.deltas import WeightDelta, put_back
from ...core.requests import EditRequest
from ...model.architectures import Layout, ModelAdapter, from_param_layout
from ...model.hooks import owned_hooks
from ...model.resume import record_block_inputs, resume_at
from ...model.scoring import pad_batch, pad_id_of
from ..common import EditHyperParams, adapter_for, already_predicted, tokenize_requests

log = logging.getLogger(__name__)

Matrices = Literal["ff2", "ff1", "both"]


@dataclasses.dataclass(kw_only=True)
class GradientHyperParams(EditHyperParams):
    """Fields the gradient baselines share.

    Attributes:
        lr: step size (learning rate).
        matrices: which MLP matrices are trained: ``"ff2"`` (the output matrix, default),
            ``"ff1"`` (the input matrix; gate and up for gated MLPs) or ``"both"``.
        target_tokens: ``"first"`` (the NLL of the target's first token at the last
            prompt position) or ``"all"`` (mean NLL of every target token, teacher forced).
        batch_size: requests per forward pass.
    """

    STEP_FIELD = "lr"

    lr: float
    matrices: Matrices = "ff2"
    target_tokens: Literal["first", "all"] = "first"
    batch_size: int = 16

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.lr) or self.lr <= 0:
            self._fail("lr", self.lr, "it must be a finite number > 0")
        if self.batch_size < 1:
            self._fail("batch_size", self.batch_size, "it must be >= 1")


@dataclass
class TrainedMatrix:
    """One matrix a baseline trains: its module path, layer, layout and Parameter."""

    module: str
    layer: int
    layout: Layout
    param: nn.Parameter


def select_matrices(model: nn.Module, hparams: GradientHyperParams) -> list[TrainedMatrix]:
    """The matrices named by ``hparams.layers`` and ``hparams.matrices``, in layer order."""
    adapter = adapter_for(model, hparams)
    out = []
    for layer in sorted(adapter.check_layer(x) for x in hparams.layers):
        names = []
        if hparams.matrices in ("ff1", "both"):
            names += adapter.ff1_names(layer)
        if hparams.matrices in ("ff2", "both"):
            names.append(adapter.ff2_name(layer))
        for name in names:
            module = adapter.module(name)
            out.append(TrainedMatrix(name, layer, adapter.layout(module), module.weight))
    return out


@contextlib.contextmanager
def training_session(model: nn.Module, matrices: Sequence[TrainedMatrix]) -> Iterator[dict[str, torch.Tensor]]:
    """Make only ``matrices`` trainable; on exit restore weights, grads and flags exactly.

    Yields:
        module path -> a clone of the original weight (as stored), for computing deltas.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    was_training = model.training
    originals = {m.module: m.param.detach().clone() for m in matrices}
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for m in matrices:
            m.param.requires_grad_(True)
        model.eval()  # no dropout: the step is deterministic
        yield originals
    finally:
        put_back((m.param, originals[m.module]) for m in matrices)
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


@contextlib.contextmanager
def gradient_only_at(modules: Sequence[nn.Module], keep: torch.Tensor) -> Iterator[None]:
    """Let gradients reach ``modules``' weights only through the positions where ``keep`` is 1.

    The outputs' values are unchanged (``out.detach() + keep * (out - out.detach())``),
    so the weight gradient is the sum over the kept positions of ``δ_i x_iᵀ``.
    """

    def hook(_module, _args, out):
        k = keep.reshape(*out.shape[:-1], 1).to(out.dtype)
        return out.detach() + k * (out - out.detach())

    with owned_hooks() as hooks:
        for m in modules:
            hooks.forward_hook(m, hook)
        yield


def target_nll(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    target_tokens: str,
    *,
    only_target_positions: Sequence[nn.Module] = (),
) -> torch.Tensor:
    """Per request, the NLL of its target (first token, or mean over all tokens), with grad.

    Args:
        only_target_positions: modules whose weight gradient should come only from the
            positions that predict the target (see :func:`gradient_only_at`).

    Returns:
        A ``[len(pairs)]`` float32 tensor.
    """
    device = next(model.parameters()).device
    teacher = target_tokens == "all"
    seqs = [p + t[:-1] if teacher else p for p, t in pairs]
    ids, mask = pad_batch(seqs, pad_id, device)
    keep = torch.zeros(ids.shape, device=device)
    for row, (p, t) in enumerate(pairs):
        keep[row, len(p) - 1 : len(p) - 1 + (len(t) if teacher else 1)] = 1.0
    with gradient_only_at(only_target_positions, keep):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    losses = []
    for row, (p, t) in enumerate(pairs):
        k = len(t) if teacher else 1
        pos = torch.arange(len(p) - 1, len(p) - 1 + k, device=device)
        logp = torch.log_softmax(logits[row, pos].float(), dim=-1)
        tgt = torch.tensor(t[:k], device=device)
        losses.append(-logp.gather(1, tgt[:, None])[:, 0].mean())
    return torch.stack(losses)


class FrozenPrefix:
    """The blocks below the lowest trained layer compute the same thing at every training step: their output
    (block ``layer``'s input) is recorded once per chunk of requests, and each step re-runs blocks ``layer..``
    only (:func:`~shift_edit.model.resume.resume_at`). :meth:`verify` checks the first step's loss against a full pass
    and turns the prefix off (full passes from then on) if they differ."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, layer: int, pairs, pad_id: int, target_tokens: str,
                 batch_size: int) -> None:
        self.adapter, self.layer, self.active = adapter, layer, True
        self.hidden: list[torch.Tensor] = []
        self.full_loss = 0.0  # the mean target NLL of the untrained model, from the same (full) passes
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                with record_block_inputs(adapter) as seen:
                    self.full_loss += float(target_nll(model, chunk, pad_id, target_tokens).sum()) / len(pairs)
                self.hidden.append(seen[layer])

    def chunk(self, k: int) -> contextlib.AbstractContextManager:
        """The context the ``k``-th chunk's training pass runs in."""
        return resume_at(self.adapter, self.layer, self.hidden[k]) if self.active else contextlib.nullcontext()

    def verify(self, first_loss: float) -> bool:
        """Is the first (untrained) step's loss the full passes' (relative 1e-5)? If not, stop using the prefix."""
        self.active = math.isclose(first_loss, self.full_loss, rel_tol=1e-5, abs_tol=1e-7)
        if not self.active:
            log.warning("training from block %d's recorded input gave loss %.6g, full passes %.6g; using full "
                        "passes", self.layer, first_loss, self.full_loss)
        return self.active


def batched_loss(
    model, pairs, pad_id, target_tokens, batch_size, reduce: Literal["sum", "mean"], only_target_positions=(),
    prefix: FrozenPrefix | None = None,
) -> float:
    """Backpropagate the target NLL over ``pairs`` in chunks (grads accumulate); return the loss. With a
    ``prefix`` (recorded for the same pairs and chunks), only the blocks from its layer run."""
    total = 0.0
    scale = 1.0 if reduce == "sum" else 1.0 / len(pairs)
    for k, start in enumerate(range(0, len(pairs), batch_size)):
        chunk = pairs[start : start + batch_size]
        with prefix.chunk(k) if prefix is not None else contextlib.nullcontext():
            nll = target_nll(model, chunk, pad_id, target_tokens, only_target_positions=only_target_positions)
        loss = nll.sum() * scale
        loss.backward()
        total += float(loss.detach())
    return total


def split_skipped(
    model: nn.Module, tok, requests: list[EditRequest], hparams: EditHyperParams
) -> tuple[list[bool], list[tuple[list[int], list[int]]]]:
    """The shared skip rule: (skipped flags, token pairs of the requests to edit)."""
    skipped = already_predicted(model, tok, requests) if hparams.skip_if_predicted else [False] * len(requests)
    pairs = tokenize_requests(tok, requests)
    return skipped, [pr for pr, s in zip(pairs, skipped) if not s]


def dense_deltas(matrices: Sequence[TrainedMatrix], originals: dict[str, torch.Tensor]) -> list[WeightDelta]:
    """Current weight minus original, as dense ``[out, in]`` float32 CPU deltas (call before restoring)."""
    out = []
    for m in matrices:
        diff = m.param.detach().float() - originals[m.module].float()
        out.append(
            WeightDelta(m.module, m.layout, dense=from_param_layout(diff, m.layout).contiguous().cpu(), layer=m.layer)
        )
    return out


def grad_deltas(matrices: Sequence[TrainedMatrix], scale: float) -> list[WeightDelta]:
    """``scale * grad`` of each matrix as dense ``[out, in]`` float32 CPU deltas."""
    out = []
    for m in matrices:
        g = m.param.grad
        g = torch.zeros_like(m.param, dtype=torch.float32) if g is None else g.float()
        out.append(
            WeightDelta(m.module, m.layout, dense=(scale * from_param_layout(g, m.layout)).contiguous().cpu(),
                        layer=m.layer)
        )
    return out


__all__ = [
    "FrozenPrefix", "GradientHyperParams", "TrainedMatrix", "batched_loss", "dense_deltas", "grad_deltas",
    "gradient_only_at", "pad_id_of", "select_matrices", "split_skipped", "target_nll", "training_session",
]
