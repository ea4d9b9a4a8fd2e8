"""How a sequential run scores CounterFact records at a checkpoint: each record's (prompt, object) token pairs,
scored in shared forward batches, reduced to the per-record values kept (:data:`RECORD_METRICS`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.requests import encode_prompt, encode_target
from ..model.scoring import ContinuationPlan, logits_at_positions, pad_id_of
from .counterfact import CounterFactCase
from .metrics import case_prompts, metrics_from_scores, target_pair
from .summarize import stats

#: per-record values kept at each checkpoint: (name, path in metrics_from_scores' output)
RECORD_METRICS: list[tuple[str, tuple[str, str]]] = [
    ("ES", ("rome", "rewrite_success")),
    ("PS", ("rome", "paraphrase_success")),
    ("NS", ("rome", "neighborhood_success")),
    ("RS", ("rome", "rephrase_success")),
    ("EM", ("rome", "rewrite_magnitude")),
    ("PM", ("rome", "paraphrase_magnitude")),
    ("NM", ("rome", "neighborhood_magnitude")),
    ("efficacy_top1", ("top1", "rewrite_acc")),
    ("paraphrase_top1", ("top1", "paraphrase_acc")),
    ("rephrase_top1", ("top1", "rephrase_acc")),
    ("neighborhood_top1", ("top1", "neighborhood_acc")),
    ("efficacy_top1_first_token", ("top1_first", "rewrite_acc")),
    ("neighborhood_top1_first_token", ("top1_first", "neighborhood_acc")),
    ("gen_efficacy", ("wild", "rewrite_success")),
    ("gen_paraphrase", ("wild", "paraphrase_success")),
    ("gen_rephrase", ("wild", "rephrase_success")),
    ("gen_neighborhood", ("wild", "neighborhood_success")),
]


def record_values(m: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, (fam, key) in RECORD_METRICS:
        v = m.get(fam, {}).get(key)
        if v is not None:
            out[name] = float(v)
    return out


@dataclass
class PromptPairs:
    """A record's (prompt, object) token pairs — (new, true) per prompt — and each prompt's group."""

    pairs: list[tuple[list[int], list[int]]]
    groups: list[str]


def _tokenise(tok, case: CounterFactCase) -> PromptPairs:
    pairs, groups = [], []
    for group, prompts in case_prompts(case).items():
        new, true = target_pair(case, group)
        for p in prompts:
            ids = encode_prompt(tok, p)
            pairs += [(ids, encode_target(tok, p, new)), (ids, encode_target(tok, p, true))]
            groups.append(group)
    return PromptPairs(pairs, groups)


def _score(
    model, tok, items: Sequence[PromptPairs], batch_size: int, records_per_plan: int = 64
) -> list[dict[str, float]]:
    """Per-record metric values; the prompts of ``records_per_plan`` records share forward batches
    (the same numbers as scoring each record alone, :class:`~shift_edit.bench.metrics.CaseScorer`)."""
    out = []
    for start in range(0, len(items), records_per_plan):
        chunk = items[start : start + records_per_plan]
        pairs = [p for it in chunk for p in it.pairs]
        plan = ContinuationPlan.build(pairs)
        logits = logits_at_positions(model, plan.seqs, plan.positions, pad_id=pad_id_of(tok), batch_size=batch_size)
        flat = iter(plan.scores(logits, pairs))
        for it in chunk:
            scores: dict[str, list] = {}
            for group in it.groups:
                scores.setdefault(group, []).append((next(flat), next(flat)))
            out.append(record_values(metrics_from_scores(scores)))
    return out


class CounterFactScoring:
    """The scoring of CounterFact records (the default of :func:`run_sequential`); zsRE and KnowEdit have
    :class:`.fact_sequential.FactScoring` with the same methods."""

    def protocol(self, base: dict[str, Any]) -> dict[str, Any]:
        return base

    def prepare(self, model: nn.Module, tok, cases: Sequence[CounterFactCase]) -> list[PromptPairs]:
        return [_tokenise(tok, c) for c in cases]

    def score(self, model: nn.Module, tok, items: Sequence[PromptPairs], batch_size: int) -> list[dict[str, float]]:
        return _score(model, tok, items, batch_size)


def record_means(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric (RECORD_METRICS' order, then any other column the rows have, e.g. zsRE/KnowEdit's), stats x100."""
    out = {}
    names = [n for n, _ in RECORD_METRICS]
    names += sorted({k for r in rows for k in r} - set(names))
    for name in names:
        vals = [r[name] * 100.0 for r in rows if name in r]
        if vals:
            out[name] = stats(vals)
    return out
