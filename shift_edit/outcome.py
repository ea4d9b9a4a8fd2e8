"""Did the edit work? Strict top-1 and target probability before and after, and a step search.

:func:`edit_outcome` measures each request of an :class:`~shift_edit.deltas.EditResult`
on its own prompt, under teacher forcing:

- ``top1``: strict top-1 (MEMIT's accuracy): *every* target token is the argmax;
- ``prob``: ``P(target | prompt)``, the product of the target tokens' probabilities.

"Before" is read with the original weights copied back in for one forward pass and the
edited ones restored afterwards (copies, so both are bit-exact): no cost is added to
:func:`~shift_edit.editing.edit` itself.

:func:`search_step` backs ``shift-edit edit --until-top1``: the smallest step (the hparams
class's ``STEP_FIELD``: SHIFT's ``eta``, the gradient baselines' ``lr``) that makes the
target the strict top-1, found by doubling from the given step and then bisecting, one edit
plus one scoring pass per probe, the model left as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ShiftEditError
from .hparams import HyperParams
from .requests import EditRequest, make_requests

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
    from .scoring import score_continuations

    scores = score_continuations(model, tok, [r.text for r in requests], [r.target_new for r in requests])
    return [(s.all_correct, math.exp(-float(s.token_nll.double().sum()))) for s in scores]


@torch.no_grad()
def _measure_with(model: nn.Module, tok, requests, weights: dict[str, torch.Tensor]) -> list[tuple[bool, float]]:
    """Measure with ``weights`` copied in for the duration; the current tensors are restored exactly."""
    saved = {}
    try:
        for name, w in weights.items():
            p = model.get_parameter(name)
            saved[name] = p.detach().clone()
            p.copy_(w)
        return measure(model, tok, requests)
    finally:
        for name, w in saved.items():
            model.get_parameter(name).copy_(w)


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
    from .requests import encode_target

    return len(encode_target(tok, r.text, r.target_new))


def step_field(hparams: HyperParams | type[HyperParams]) -> str | None:
    """The hparams field holding the step size (the class's ``STEP_FIELD``), or None."""
    cls = hparams if isinstance(hparams, type) else type(hparams)
    return getattr(cls, "STEP_FIELD", None)


@dataclass
class StepSearch:
    """What :func:`search_step` tried and chose.

    Attributes:
        field: the hparams field searched (``eta``, ``lr``).
        start: the step the hparams had.
        step: the chosen step (the smallest that flipped, or the last tried if none did).
        found: whether a step making every target the strict top-1 was found.
        probes: ``(step, all top-1, min P(target))`` for every step tried, in order.
    """

    field: str
    start: float
    step: float
    found: bool
    probes: list[tuple[float, bool, float]] = field(default_factory=list)

    def line(self) -> str:
        if not self.found:
            return (f"--until-top1: no {self.field} up to {self.step:.4g} made the target the strict top-1 "
                    f"({len(self.probes)} tries); keeping {self.field} {self.start:.4g}")
        how = "already enough" if self.step == self.start else f"chosen from {self.start:.4g}"
        return f"--until-top1: {self.field} {self.step:.4g} ({how}; {len(self.probes)} tries of one edit + one forward pass)"


def search_step(
    model: nn.Module,
    tok,
    requests,
    hparams: HyperParams,
    *,
    max_doublings: int = 12,
    bisections: int = 4,
) -> StepSearch:
    """The smallest step that makes every request's target the strict top-1.

    Doubles the hparams' step until the targets flip (at most ``max_doublings`` times), then
    bisects ``bisections`` times between the last failing and the first working step. Each
    probe edits, measures and undoes, so the model ends as it started. A probe refused by
    the algorithm (a delta too large, say) counts as not flipping and ends the doubling.

    Raises:
        ShiftEditError: the algorithm has no step size (its hparams class has no ``STEP_FIELD``).
    """
    from .editing import edit

    name = step_field(hparams)
    if name is None:
        raise ShiftEditError(f"--until-top1 needs an algorithm with a step size; {type(hparams).ALG_NAME} has none")
    reqs = make_requests(requests)
    start = float(getattr(hparams, name))
    probes: list[tuple[float, bool, float]] = []

    def flips(step: float) -> bool:
        try:
            res = edit(model, tok, reqs, hparams.replace(**{name: step}))
        except ShiftEditError as exc:
            log.info("step %s refused: %s", step, exc)
            probes.append((step, False, float("nan")))
            raise
        try:
            got = measure(model, tok, reqs)
        finally:
            res.undo()
        ok = all(t for t, _ in got)
        probes.append((step, ok, min(p for _, p in got)))
        return ok

    lo, hi = None, start
    try:
        ok = flips(hi)
        doublings = 0
        while not ok and doublings < max_doublings:
            lo, hi = hi, hi * 2
            doublings += 1
            ok = flips(hi)
    except ShiftEditError:
        ok = False
    if not ok:
        return StepSearch(name, start, hi, False, probes)
    if lo is not None:
        for _ in range(bisections):
            mid = (lo + hi) / 2
            try:
                good = flips(mid)
            except ShiftEditError:
                good = False
            lo, hi = (lo, mid) if good else (mid, hi)
    return StepSearch(name, start, hi, True, probes)
