"""Did the edit work? Strict top-1 and target probability before and after.

:func:`edit_outcome` measures each request of an :class:`~shift_edit.core.result.EditResult`
on its own prompt, under teacher forcing:

- ``top1``: strict top-1 (MEMIT's accuracy): *every* target token is the argmax;
- ``prob``: ``P(target | prompt)``, the product of the target tokens' probabilities.

"Before" is read with the original weights copied back in for one forward pass and the
edited ones restored afterwards (copies, so both are bit-exact): no cost is added to
:func:`~shift_edit.core.editing.edit` itself.

The step search of ``shift-edit edit --until-top1`` is :mod:`shift_edit.core.step_search`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .deltas import swapped_weights
from .errors import ShiftEditError
from .hparams import HyperParams
from .requests import EditRequest, encode_target
from ..model.scoring import score_continuations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditOutcome:
    """One request's strict top-1 and target probability before and after the edit."""

    prompt: str
    target: str
    n_tokens: int
    top1_before: bool
    top1_after: bool
    prob_before: float
    prob_after: float

    @property
    def flipped(self) -> bool:
        """The target is the strict top-1 after the edit."""
        return self.top1_after

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for people: ``top-1 (all 2 tokens): no -> yes, P(target) 0.120 -> 0.999``."""
        yn = {True: "yes", False: "no"}
        return (f"target {self.target!r} strict top-1 (all {self.n_tokens} token{'s' if self.n_tokens > 1 else ''}): "
                f"{yn[self.top1_before]} -> {yn[self.top1_after]}, "
                f"P(target) {fmt_prob(self.prob_before)} -> {fmt_prob(self.prob_after)}")


def fmt_prob(p: float) -> str:
    """``0.430``; small values keep their digits: ``2.1e-05``."""
    return f"{p:.3f}" if p >= 1e-3 or p == 0 else f"{p:.1e}"


def measure(model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[tuple[bool, float]]:
    """``(strict top-1, P(target))`` of each request's ``target_new`` on its prompt, as the model is now."""
    scores = score_continuations(model, tok, [r.text for r in requests], [r.target_new for r in requests])
    return [(s.all_correct, math.exp(-float(s.token_nll.double().sum()))) for s in scores]


def _measure_with(model: nn.Module, tok, requests, weights: dict[str, torch.Tensor]) -> list[tuple[bool, float]]:
    """Measure with ``weights`` copied in for the duration; the current tensors are restored exactly."""
    with swapped_weights(model, weights):
        return measure(model, tok, requests)


def edit_outcome(result, tok) -> list[EditOutcome]:
    """Per request of ``result`` (an applied :class:`EditResult`): strict top-1 and P(target) before/after."""
    if result.undone:
        raise ShiftEditError("the edit was undone: its outcome can no longer be measured")
    after = measure(result.model, tok, result.requests)
    before = _measure_with(result.model, tok, result.requests, result.orig_weights) if result.orig_weights else after
    return [
        EditOutcome(r.text, r.target_new, _n_tokens(tok, r), b[0], a[0], b[1], a[1])
        for r, b, a in zip(result.requests, before, after)
    ]


def _n_tokens(tok, r: EditRequest) -> int:
    return len(encode_target(tok, r.text, r.target_new))


def step_field(hparams: HyperParams | type[HyperParams]) -> str | None:
    """The hparams field holding the step size (the class's ``STEP_FIELD``), or None."""
    cls = hparams if isinstance(hparams, type) else type(hparams)
    return getattr(cls, "STEP_FIELD", None)
