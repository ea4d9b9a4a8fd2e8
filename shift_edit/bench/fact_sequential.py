"""zsRE and KnowEdit in ``--sequential T --batch-edits B``: the scoring :func:`.sequential.run_sequential` uses
for them (checkpoints, unedited reference and retention curves are the CounterFact harness's own).

Each record is prepared once on the unedited model before any saved state is loaded (zsRE: its token pairs;
KnowEdit: EasyEdit's pre-edit measurement, whose locality tokens are the reference the edited model is compared
with). At a checkpoint every record edited so far is scored in its data set's families (:mod:`.fact_metrics`),
as flat columns (:func:`.fact_metrics.flat_values`). Fluency (generation) is not measured in sequential runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .fact_metrics import easyedit_post, easyedit_pre, families_for, flat_values, zsre_pairs, zsre_scores
from .facts import FactCase


class FactScoring:
    """The sequential harness's scoring of zsRE (``fmt="zsre"``) or KnowEdit (``fmt="knowedit"``) records."""

    def __init__(self, fmt: str, dataset: str) -> None:
        self.fmt = fmt
        self.dataset = dataset

    def protocol(self, base: dict[str, Any]) -> dict[str, Any]:
        """The sequential protocol with this data set's families in place of CounterFact's."""
        fams = {**families_for(self.fmt, fluency=False), "perplexity": base["metric_families"].get("perplexity"),
                "not_computed": "CounterFact's families (rome, top1, wild) and neighborhood KL; Fluency (generation)"}
        return {**base, "dataset": self.dataset, "format": self.fmt, "metric_families": fams}

    def prepare(self, model: nn.Module, tok, cases: Sequence[FactCase]) -> list[Any]:
        """Per record, what scoring needs (called on the unedited model)."""
        if self.fmt == "zsre":
            return [zsre_pairs(tok, c) for c in cases]
        return [(c, easyedit_pre(model, tok, c)) for c in cases]

    def score(self, model: nn.Module, tok, items: Sequence[Any], batch_size: int) -> list[dict[str, float]]:
        """Per record, its flat family values on the model as it is now."""
        if not items:
            return []
        if self.fmt == "zsre":
            out = []
            for s in range(0, len(items), 64):  # 64 records' prompts share forward batches
                out += [flat_values(m) for m in zsre_scores(model, tok, items[s : s + 64], batch_size=batch_size)]
            return out
        return [flat_values({"easyedit": easyedit_post(model, tok, c, pre)}) for c, pre in items]
