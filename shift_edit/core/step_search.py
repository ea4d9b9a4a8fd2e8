"""The smallest step that makes an edit's target the strict top-1 (``shift-edit edit --until-top1``).

:func:`search_step`: the hparams class's ``STEP_FIELD`` (SHIFT's ``eta``, the gradient
baselines' ``lr``), found by doubling from the given step and then bisecting, one edit plus
one scoring pass per probe, the model left as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .editing import edit
from .errors import ShiftEditError
from .hparams import HyperParams
from .registry import algorithm_for_hparams
from .requests import make_requests
from .result import measure

log = logging.getLogger(__name__)


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
        return (f"--until-top1: {self.field} {self.step:.4g} ({how}; {len(self.probes)} tries of one edit + one "
                "forward pass)")


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
    name = algorithm_for_hparams(hparams).step_field
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
