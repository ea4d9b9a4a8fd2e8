"""The result of an edit: what changed, exact undo, the measured outcome, saving as a patch."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .deltas import WeightDelta, restore_weights
from .errors import ShiftEditError
from .hparams import HyperParams
from .outcome import edit_outcome, fmt_prob
from ..files.patch_format import save_patch
from .requests import EditRequest


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
