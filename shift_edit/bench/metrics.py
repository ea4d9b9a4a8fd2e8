"""Per-record CounterFact metrics (ROME's probability comparisons, strict top-1) and the neighborhood KL.

Generation and n-gram entropy live in :mod:`.generation`, WikiText perplexity in :mod:`.wikitext`.

Metric families (every number says which one it belongs to):

- ``rome``: ROME's probability comparisons from mean token NLLs (teacher forcing).
  ES/PS = fraction of rewrite/paraphrase prompts with NLL(new) < NLL(true); NS = fraction of
  neighborhood prompts with NLL(true) < NLL(new). Magnitudes EM/PM = mean of
  exp(-NLL(new)) - exp(-NLL(true)), NM = mean of exp(-NLL(true)) - exp(-NLL(new)).
- ``top1``: strict top-1 accuracy (MEMIT; Backward Lens Table 6): a prompt counts only if
  every token of the correct object is the argmax at its teacher-forced position; the
  correct object is target_new for rewrite/paraphrase and target_TRUE for neighborhood.
  ``top1_first`` is the first-token-only variant.
- ``neighborhood_kl``: KL(unedited || edited) of the next-token distributions after each
  neighborhood prompt (nats), averaged over prompts.
- ``generation``: ROME's n-gram entropy, see :func:`.generation.ngram_entropy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.requests import encode_prompt, encode_target
from ..model.scoring import ContinuationPlan, ContinuationScore, logits_at_positions, pad_batch, pad_id_of
from .counterfact import CounterFactCase

if TYPE_CHECKING:
    from ..model.resume import BlockRecorder, Resume

#: prompt groups scored per record, with the object that counts as correct in top-1
GROUPS = ("rewrite", "paraphrase", "rephrase", "neighborhood")


def case_prompts(case: CounterFactCase) -> dict[str, tuple[str, ...]]:
    """The prompt groups of a case (empty groups dropped)."""
    groups = {
        "rewrite": case.rewrite_prompts,
        "paraphrase": case.paraphrase_prompts,
        "rephrase": case.rephrase_prompts,
        "neighborhood": case.neighborhood_prompts,
    }
    return {k: v for k, v in groups.items() if v}


def target_pair(case: CounterFactCase, group: str) -> tuple[str, str]:
    """(new, true) objects for a prompt group."""
    if group == "neighborhood":
        return case.request.target_new, case.neighborhood_true
    return case.request.target_new, case.request.target_true


@dataclass
class _Part:
    """Pairs scored together: their plan and, per pair, the prompt group it belongs to."""

    pairs: list[tuple[list[int], list[int]]]
    groups: list[str]
    plan: ContinuationPlan | None = None


class CaseScorer:
    """A record's forward passes, planned once: every (prompt, new) and (prompt, true) pair,
    with shared prefixes read off one pass (:class:`~shift_edit.model.scoring.ContinuationPlan`).

    Two parts are planned separately: ``near`` (neighborhood prompts, whose unedited
    next-token distribution the KL needs in full) and ``edit`` (rewrite, paraphrase and
    rephrase prompts, which the unedited pass only needs up to the edited block). The logits
    at the last position of each neighborhood prompt are among the planned positions, so
    scoring and the KL share one pass.
    """

    PARTS = ("near", "edit")

    def __init__(self, tok, case: CounterFactCase, *, share_prefixes: bool = True) -> None:
        self.parts = {name: _Part([], []) for name in self.PARTS}
        for group, prompts in case_prompts(case).items():
            part = self.parts["near" if group == "neighborhood" else "edit"]
            new, true = target_pair(case, group)
            for p in prompts:
                ids = encode_prompt(tok, p)
                part.pairs += [(ids, encode_target(tok, p, new)), (ids, encode_target(tok, p, true))]
                part.groups.append(group)
        for part in self.parts.values():
            part.plan = ContinuationPlan.build(part.pairs, share_prefixes=share_prefixes)
        self.pad_id = pad_id_of(tok)

    @property
    def n_neighborhood(self) -> int:
        return len(self.parts["near"].groups)

    def logits(
        self, model: nn.Module, *, batch_size: int = 64, parts: Sequence[str] = PARTS,
        record: Mapping[str, BlockRecorder] | None = None, resume: Mapping[str, Resume] | None = None,
    ) -> dict[str, list[torch.Tensor | None]]:
        """Logits at every planned position of ``parts`` (see
        :func:`~shift_edit.model.scoring.logits_at_positions`); ``record[part]`` keeps that part's
        block inputs, ``resume[part]`` re-runs only the blocks it names (:mod:`shift_edit.model.resume`)."""
        out = {}
        for name in parts:
            plan = self.parts[name].plan
            out[name] = logits_at_positions(model, plan.seqs, plan.positions, pad_id=self.pad_id, batch_size=batch_size,
                                            record=None if record is None else record[name],
                                            resume=None if resume is None else resume[name])
        return out

    def scores(
        self, logits: dict[str, list[torch.Tensor]]
    ) -> dict[str, list[tuple[ContinuationScore, ContinuationScore]]]:
        """(new, true) scores per prompt group, as :func:`score_case` returns them."""
        out: dict[str, list] = {}
        for name in ("edit", "near"):
            part = self.parts[name]
            flat = part.plan.scores(logits[name], part.pairs)
            for j, group in enumerate(part.groups):
                out.setdefault(group, []).append((flat[2 * j], flat[2 * j + 1]))
        return {g: out[g] for g in GROUPS if g in out}

    def neighborhood_ends(self) -> list[tuple[int, int]]:
        """(sequence, position) of each neighborhood prompt's last token in the ``near`` plan: where the
        logits of :meth:`neighborhood_logprobs` are read."""
        plan = self.parts["near"].plan
        return [(j, plan.positions[j][offsets[0]]) for j, offsets in plan.reads[0::2]]

    def neighborhood_logprobs(self, logits: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Next-token log-probabilities after each neighborhood prompt, ``[n, vocab]``."""
        plan = self.parts["near"].plan
        rows = []
        for i in range(0, len(plan.reads), 2):  # (prompt, new) of each prompt: its first read is the prompt's end
            j, offsets = plan.reads[i]
            rows.append(logits["near"][j][offsets[0]])
        if not rows:
            return torch.zeros(0)
        return torch.log_softmax(torch.stack(rows), dim=-1).cpu()


def score_case(
    model: nn.Module, tok, case: CounterFactCase, *, batch_size: int = 64, share_prefixes: bool = True
) -> dict[str, list[tuple[ContinuationScore, ContinuationScore]]]:
    """Teacher-forced (new, true) scores for every prompt of a case, all in batches
    (``batch_size=1, share_prefixes=False``: one forward pass per (prompt, target) pair)."""
    scorer = CaseScorer(tok, case, share_prefixes=share_prefixes)
    return scorer.scores(scorer.logits(model, batch_size=batch_size))


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def metrics_from_scores(scores: dict[str, list[tuple[ContinuationScore, ContinuationScore]]]) -> dict:
    """ROME and top-1 metrics (values in [0, 1]) plus the raw NLLs, from :func:`score_case` output."""
    rome: dict[str, float] = {}
    top1: dict[str, float] = {}
    top1_first: dict[str, float] = {}
    nlls: dict[str, list[dict[str, float]]] = {}
    correct: dict[str, list[bool]] = {}  # per prompt, strict top-1 (MEMIT's *_prompts_correct; export)
    for group, rows in scores.items():
        nll = [(n.mean_nll, t.mean_nll) for n, t in rows]
        nlls[group] = [{"target_new": a, "target_true": b} for a, b in nll]
        correct[group] = [t.all_correct if group == "neighborhood" else n.all_correct for n, t in rows]
        if group == "neighborhood":
            rome[f"{group}_success"] = _mean([float(b < a) for a, b in nll])
            rome[f"{group}_magnitude"] = _mean([math.exp(-b) - math.exp(-a) for a, b in nll])
            top1[f"{group}_acc"] = _mean([float(t.all_correct) for _, t in rows])
            top1_first[f"{group}_acc"] = _mean([float(t.first_correct) for _, t in rows])
        else:
            rome[f"{group}_success"] = _mean([float(a < b) for a, b in nll])
            rome[f"{group}_magnitude"] = _mean([math.exp(-a) - math.exp(-b) for a, b in nll])
            top1[f"{group}_acc"] = _mean([float(n.all_correct) for n, _ in rows])
            top1_first[f"{group}_acc"] = _mean([float(n.first_correct) for n, _ in rows])
    return {"rome": rome, "top1": top1, "top1_first": top1_first, "nll": nlls, "top1_correct": correct}


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tok, prompts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[n, vocab]`` float32 on CPU."""
    device = next(model.parameters()).device
    seqs = [encode_prompt(tok, p) for p in prompts]
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        ids, mask = pad_batch(chunk, pad_id_of(tok), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        last = torch.tensor([len(c) - 1 for c in chunk], device=device)
        out.append(torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), -1).cpu())
    return torch.cat(out)


def kl_divergence(logp_ref: torch.Tensor, logp_new: torch.Tensor) -> torch.Tensor:
    """KL(ref || new) per row, in nats."""
    return (logp_ref.exp() * (logp_ref - logp_new)).sum(-1).clamp_min(0.0)
