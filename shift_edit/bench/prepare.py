"""A benchmark record's state before its edit (:class:`Prepared`): its planned passes, what they recorded on the
unedited model, the KL reference; for one record alone (:func:`prepare_record`) or many in shared batches
(:func:`prepare_records`, :mod:`.packing`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..algorithms.common import adapter_for
from ..core.hparams import HyperParams
from ..model.architectures import ModelAdapter
from ..model.resume import BlockRecorder, Resume
from .bench_config import NO_EDIT, BenchConfig
from .counterfact import CounterFactCase
from .metrics import CaseScorer
from .packing import unedited_passes


def planned_block(adapter: ModelAdapter, hparams: HyperParams | None) -> int | None:
    """The lowest block the hparams say they edit (the unedited pass may stop there), or None."""
    layers = getattr(hparams, "layers", None)
    if not layers:
        return None
    return min(adapter.check_layer(int(x)) for x in layers)


@dataclass
class Prepared:
    """One record's state before the edit: its scorer, the recorders of its passes (the input of
    the planned block in each batch; none when nothing can be skipped), the unedited
    neighborhood distributions (KL reference), and for the unedited row scored with other
    records (:mod:`.packing`) its scores."""

    case: CounterFactCase
    position: int
    scorer: CaseScorer
    recorders: dict[str, BlockRecorder]
    pre_logp: torch.Tensor | None
    scores: dict | None = None

    def resume_after(self, deltas) -> dict[str, Resume] | None:
        """Per part, the blocks the model edited by ``deltas`` must re-run; None: full passes
        (nothing recorded, or the edit changed a block before the recorded one)."""
        if not any(len(r) for r in self.recorders.values()):
            return None
        resume = {part: r.resume_after(deltas) for part, r in self.recorders.items()}
        return None if any(r is None for r in resume.values()) else resume

    def resume_unedited(self) -> dict[str, Resume] | None:
        """For the model left unedited (an edit that was skipped or refused): go on from the recorded block
        (its later blocks are the ones that ran when it was recorded); None when nothing was recorded."""
        if not any(len(r) for r in self.recorders.values()):
            return None
        resume = {part: r.resume_at(r.blocks[0]) for part, r in self.recorders.items()}
        return None if any(r is None for r in resume.values()) else resume


def prepare_record(model, tok, case, position, cfg, adapter, planned, kl_on: bool) -> Prepared:
    """One record's state before the edit, its passes alone (the reference path of :func:`prepare_records`)."""
    scorer = CaseScorer(tok, case)
    kl_on = kl_on and scorer.n_neighborhood > 0
    recorders: dict[str, BlockRecorder] = {}
    if planned is None or planned == 0:  # nothing to skip: the unedited pass is only the KL reference
        pre = scorer.logits(model, batch_size=cfg.batch_size, parts=("near",)) if kl_on else None
    else:  # the passes stop at the planned block, but the KL reference needs the neighborhood logits
        recorders = {"near": BlockRecorder(adapter, planned, stop=not kl_on),
                     "edit": BlockRecorder(adapter, planned, stop=True)}
        pre = scorer.logits(model, batch_size=cfg.batch_size, record=recorders)
    return Prepared(case, position, scorer, recorders, scorer.neighborhood_logprobs(pre) if kl_on else None)


def prepare_records(model, tok, cases: Sequence[CounterFactCase], positions: Sequence[int],
                    cfg: BenchConfig) -> list[Prepared]:
    """What :func:`~.runner.evaluate_batch` computes before its edit, for many records at once: their passes on the
    unedited model share batches (:func:`.packing.unedited_passes`); the unedited row (NONE) is scored whole.
    Must run on the unedited model."""
    scorers = [CaseScorer(tok, c) for c in cases]
    if cfg.alg == NO_EDIT:
        done = unedited_passes(model, scorers, batch_size=cfg.batch_size, full=True)
    else:
        adapter = adapter_for(model, cfg.hparams)
        done = unedited_passes(model, scorers, batch_size=cfg.batch_size, full=False, adapter=adapter,
                               block=planned_block(adapter, cfg.hparams), kl=cfg.neighborhood_kl)
    return [Prepared(c, p, s, u.recorders, u.pre_logp, u.scores)
            for c, p, s, u in zip(cases, positions, scorers, done)]
