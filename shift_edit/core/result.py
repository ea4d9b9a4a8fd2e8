"""The result of an edit: what changed, exact undo, the measured outcome, saving as a patch.

**Did the edit work?** :func:`edit_outcome` (:meth:`EditResult.outcome`) measures each request of an edit
on its own prompt, under teacher forcing:

- ``top1``: strict top-1 (MEMIT's accuracy): *every* target token is the argmax;
- ``prob``: ``P(target | prompt)``, the product of the target tokens' probabilities.

"Before" is read with the original weights copied back in for one forward pass and the
edited ones restored afterwards (copies, so both are bit-exact): no cost is added to
:func:`~shift_edit.core.editing.edit` itself.

The step search of ``shift-edit edit --until-top1`` is :mod:`shift_edit.core.step_search`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files.patch_format import save_patch
from ..model.scoring import score_continuations
from .deltas import WeightDelta, restore_weights, swapped_weights
from .errors import ShiftEditError
from .hparams import HyperParams
from .requests import EditRequest, encode_target


@dataclass
class EditResult:
    """What an edit did to a model, with exact undo.

    Attributes:
        model: the edited model (weights changed in place).
        algorithm: registry name of the algorithm.
        hparams: the hparams used.
        requests: the requests, normalised.
        deltas: the applied deltas (empty if every request was skipped).
        orig_weights: parameter name -> the tensor before this edit (CPU clone).
        base_hashes: parameter name -> sha256 of the weight before this edit.
        skipped: per request, whether it was skipped (target already predicted).
        info: per-request algorithm details (e.g. ||x_n||, eta used).
        tok: the tokenizer the edit was made with (set by :func:`~shift_edit.core.editing.edit`);
            needed by :meth:`outcome`.
    """

    model: nn.Module
    algorithm: str
    hparams: HyperParams
    requests: list[EditRequest]
    deltas: list[WeightDelta]
    orig_weights: dict[str, torch.Tensor]
    base_hashes: Mapping[str, str]
    skipped: list[bool]
    info: list[dict[str, Any]] = field(default_factory=list)
    undone: bool = False
    tok: Any = field(default=None, repr=False, compare=False)
    _outcome: Any = field(default=None, init=False, repr=False, compare=False)

    def outcome(self, tok: Any = None) -> list:
        """Per request: strict top-1 (every target token the argmax) and ``P(target)`` before
        and after, as :class:`~shift_edit.core.outcome.EditOutcome` (measured once, then cached).

        Raises:
            ShiftEditError: no tokenizer is known, or the edit was undone.
        """
        if self._outcome is None:
            tok = tok if tok is not None else self.tok
            if tok is None:
                raise ShiftEditError("EditResult.outcome needs the tokenizer: outcome(tok)")
            self._outcome = edit_outcome(self, tok)
        return self._outcome

    def __post_init__(self) -> None:
        if self.orig_weights and not self.undone:  # an applied edit: remembered for undo's order check
            live = [ref for ref in _LIVE.get(self.model, []) if (r := ref()) is not None and not r.undone]
            _LIVE[self.model] = [*live, weakref.ref(self)]

    def undo(self) -> None:
        """Restore every weight this edit changed, bit for bit, in place.

        Raises:
            ShiftEditError: a later edit of one of the same matrices is still applied (undo
                restores this edit's originals, which would silently drop the later edit and leave
                its own undo wrong): undo edits newest first; the message names the one to undo first.
        """
        if self.undone:
            return
        later = self._later_overlapping()
        if later:
            newest = later[-1]
            shared = sorted(set(newest.orig_weights) & set(self.orig_weights))
            req = newest.requests[0] if newest.requests else None
            what = f"the {newest.algorithm} edit" + (f" {req.text!r} -> {req.target_new!r}" if req else "")
            more = f" ({len(later)} later edits of these matrices are still applied)" if len(later) > 1 else ""
            raise ShiftEditError(
                f"cannot undo this edit out of order: {what}, made after it, also changed {shared[0]} and is still "
                f"applied{more}; undo that one first (undo edits newest first)"
            )
        restore_weights(self.model, self.orig_weights)
        self.undone = True

    def _later_overlapping(self) -> list[EditResult]:
        """Edits applied to the same model after this one, not undone, that share a changed matrix."""
        results = [r for ref in _LIVE.get(self.model, []) if (r := ref()) is not None]
        mine = next((i for i, r in enumerate(results) if r is self), None)
        if mine is None:
            return []
        return [r for r in results[mine + 1 :] if not r.undone and set(r.orig_weights) & set(self.orig_weights)]

    def summary(self, *, outcome: bool = True) -> list[dict[str, Any]]:
        """One row per changed matrix: layer, module, rank, delta norm, relative norm, and the
        requests that were skipped (already predicted; they contribute nothing). An edit whose
        requests were all skipped changed no matrix: see :attr:`skipped`.

        With ``outcome`` (default) and a known tokenizer, the returned list also carries
        ``.outcome``: one dict per request with ``top1_before``/``top1_after`` (strict: every
        target token the argmax) and ``prob_before``/``prob_after`` (P(target)); see
        :meth:`outcome`. Its ``str()`` is a readable report of both."""
        params = dict(self.model.named_parameters())
        rows = EditSummary()
        for d in self.deltas:
            norm = d.norm()
            base = float(self.orig_weights[d.param].float().norm())
            rows.append(
                {
                    "layer": d.layer,
                    "module": d.module,
                    "rank": d.rank,
                    "delta_norm": norm,
                    "relative_norm": norm / base if base else float("inf"),
                    "dtype": str(params[d.param].dtype).replace("torch.", ""),
                    "skipped_requests": [i for i, sk in enumerate(self.skipped) if sk],
                }
            )
        if outcome and (self.tok is not None or self._outcome is not None) and not self.undone:
            rows.outcome = [o.to_dict() for o in self.outcome()]
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (no tensors)."""
        return {
            "algorithm": self.algorithm,
            "hparams": self.hparams.to_dict(),
            "requests": [r.to_dict() for r in self.requests],
            "skipped": self.skipped,
            "changes": list(self.summary(outcome=False)),
            "info": self.info,
        }

    def save_patch(self, path: str | Path) -> Path:
        """Write the edit as a small patch file (see :mod:`shift_edit.files.patch`).

        Raises:
            ShiftEditError: the edit changed no weight (every request was skipped): no patch is written.
        """
        if not self.deltas:
            raise ShiftEditError("this edit changed no weight (every request was skipped: its target was already "
                                 "the top-1), so there is no patch to write")
        return save_patch(self, path)


# model -> the applied edits (weakly held: a result that is gone cannot be undone), oldest first
_LIVE: "weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[EditResult]]]" = weakref.WeakKeyDictionary()


class EditSummary(list):
    """:meth:`EditResult.summary`: the per-matrix rows (a list) plus ``outcome``, one dict per
    request (strict top-1 and P(target) before/after), or None when not measured."""

    outcome: list[dict[str, Any]] | None = None

    def __str__(self) -> str:
        lines = []
        for o in self.outcome or []:
            yn = {True: "yes", False: "no"}
            lines.append(f"target {o['target']!r}: strict top-1 {yn[o['top1_before']]} -> {yn[o['top1_after']]}, "
                         f"P(target) {fmt_prob(o['prob_before'])} -> {fmt_prob(o['prob_after'])}")
        for r in self:
            rank = "dense" if r["rank"] is None else f"rank {r['rank']}"
            lines.append(f"{r['module']} (layer {r['layer']}): {rank}, |delta| {r['delta_norm']:.4g}, "
                         f"relative {r['relative_norm']:.3g}")
        return "\n".join(lines)


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
