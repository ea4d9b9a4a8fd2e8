"""WILD-style free-generation metric (metric family ``wild``), adapted from "The Mirage of Model
Editing" (2025): the model answers in its own words instead of being teacher-forced.

Per prompt: greedy decoding of up to ``max_new_tokens`` new tokens (stopping early only when every
row of the decoding batch has produced EOS; a row's text ends at its first EOS). The prompt
succeeds when the object that should be said appears in the continuation before the competing
one: for rewrite / paraphrase / rephrase prompts the NEW object before the TRUE one, for
neighborhood prompts the record's TRUE neighborhood object before the new one. Matching is on
normalised text (Unicode NFKC, case-folded, whitespace runs collapsed to one space) and counts
whole words only (an occurrence not preceded or followed by a letter or digit: ``Oman`` is not
found in ``woman``, ``India`` not in ``Indiana``); "before" compares first occurrences (when both
start at one place, one object beginning the other, the longer one is what was said).

Summary columns (percent): ``gen_efficacy`` (rewrite prompt), ``gen_paraphrase`` (mean over a
record's paraphrase prompts), ``gen_rephrase`` (EasyEdit records), ``gen_neighborhood`` (opt-in).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.hooks import head_only_at
from ..model.scoring import pad_batch, pad_id_of
from .counterfact import CounterFactCase
from .generation import GenerationGroup, _row_deltas, cache_keyword, grouped_prompts

#: prompt group -> summary column
COLUMNS = {"rewrite": "gen_efficacy", "paraphrase": "gen_paraphrase", "rephrase": "gen_rephrase",
           "neighborhood": "gen_neighborhood"}
DEFAULT_MAX_NEW_TOKENS = 20

PROTOCOL = ("WILD-style free generation (The Mirage of Model Editing, adapted): greedy decoding of up to {n} new "
            "tokens from each {groups} prompt (KV cache, left padding); success = the wanted object appears in the "
            "continuation before the competing one (rewrite/paraphrase/rephrase: NEW before TRUE; neighborhood: the "
            "TRUE neighborhood object before NEW); text NFKC-normalised, case-folded, whitespace collapsed; whole-word "
            "occurrences only (not next to a letter or digit); first occurrences compared (at one place: the longer "
            "object); per record the mean over "
            "a group's prompts; columns gen_efficacy/gen_paraphrase/gen_rephrase/gen_neighborhood")


def protocol(max_new_tokens: int, neighborhood: bool) -> str:
    """The family's protocol line for ``params.json`` (which prompt groups, how many tokens)."""
    groups = "rewrite, paraphrase, rephrase and neighborhood" if neighborhood else "rewrite, paraphrase and rephrase"
    return PROTOCOL.format(n=max_new_tokens, groups=groups)


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def first_index(text: str, obj: str) -> int | None:
    """Index of the first whole-word occurrence of ``obj`` in ``text`` (both normalised here), or None."""
    needle = normalise(obj)
    if not needle:
        return None
    m = re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", normalise(text))
    return None if m is None else m.start()


def appears_first(text: str, wanted: str, other: str) -> bool:
    """Whether ``wanted`` occurs in ``text`` and ``other`` does not occur before it. When both first
    occur at one place (one object begins the other: "New York" / "New York City"), the longer one
    is what the text says."""
    a = first_index(text, wanted)
    if a is None:
        return False
    b = first_index(text, other)
    return b is None or a < b or (a == b and len(normalise(wanted)) > len(normalise(other)))


@dataclass
class WildPrompts:
    """One record's prompts per group and, per group, (object that must come first, competitor)."""

    prompts: dict[str, list[str]]
    objects: dict[str, tuple[str, str]]

    @property
    def flat(self) -> list[str]:
        return [p for g in self.prompts for p in self.prompts[g]]


def wild_prompts(case: CounterFactCase, *, neighborhood: bool = False) -> WildPrompts:
    """The record's WILD prompts: rewrite, paraphrase and rephrase (and neighborhood if asked)."""
    new, true = case.request.target_new, case.request.target_true or ""
    groups = {"rewrite": (case.rewrite_prompts, (new, true)), "paraphrase": (case.paraphrase_prompts, (new, true)),
              "rephrase": (case.rephrase_prompts, (new, true))}
    if neighborhood:
        groups["neighborhood"] = (case.neighborhood_prompts, (case.neighborhood_true, new))
    kept = {g: v for g, v in groups.items() if v[0]}
    return WildPrompts({g: list(p) for g, (p, _) in kept.items()}, {g: o for g, (_, o) in kept.items()})


def wild_metrics(spec: WildPrompts, texts: Sequence[str]) -> dict[str, Any]:
    """The record's ``wild`` metrics from the continuations of ``spec.flat`` (in that order):
    ``<group>_success`` (mean over the group's prompts, in [0, 1]), per-prompt hits and the texts."""
    out: dict[str, Any] = {}
    hits: dict[str, list[bool]] = {}
    by_group: dict[str, list[str]] = {}
    it = iter(texts)
    for group, prompts in spec.prompts.items():
        wanted, other = spec.objects[group]
        by_group[group] = [next(it) for _ in prompts]
        hits[group] = [appears_first(t, wanted, other) for t in by_group[group]]
        out[f"{group}_success"] = sum(hits[group]) / len(hits[group])
    return {**out, "hits": hits, "texts": by_group}


def _stop_ids(model: nn.Module, tok) -> set[int]:
    """EOS token ids: the tokenizer's and the generation config's (an int or a list)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra) if isinstance(extra, (list, tuple)) else ({extra} if extra is not None else set())
    return {int(i) for i in ids}


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, tok, groups: Sequence[GenerationGroup], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[list[list[int]]]:
    """Greedy new token ids after every prompt of every group, in one decoding batch.

    Prompts are encoded as the harness encodes them (:func:`~shift_edit.core.requests.encode_prompt`),
    left-padded, with position ids counted from each row's first real token and a KV cache; each
    group's deltas are added to its own rows (as for ROME's generation). A row's ids stop before its
    first EOS; decoding stops after ``max_new_tokens`` steps or once every row has produced EOS.

    Returns:
        per group, per prompt, the new token ids (EOS excluded).
    """
    device = next(model.parameters()).device
    seqs, rows = grouped_prompts(tok, groups)
    new: list[list[int]] = [[] for _ in seqs]
    if not seqs or max_new_tokens < 1:
        return [new[sl] for sl in rows]
    stop = _stop_ids(model, tok)
    ids, mask = pad_batch(seqs, pad_id_of(tok), device, left=True)
    step_ids, step_pos = ids, (mask.cumsum(-1) - 1).clamp_min(0)
    done = [False] * len(seqs)
    past = None
    cache_kw = cache_keyword(model)
    with _row_deltas(model, groups, rows, len(seqs)):
        for step in range(max_new_tokens):
            with head_only_at(model, tuple(step_ids.shape), [[step_ids.shape[1] - 1]] * len(seqs)) as gather:
                res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                            **{cache_kw: past})
                nxt = torch.stack(gather(res.logits))[:, 0].argmax(-1)
            past = res[cache_kw] if cache_kw in res.keys() else None
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in stop:
                        done[i] = True
                    else:
                        new[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            step_ids = nxt[:, None].to(device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [new[sl] for sl in rows]


@dataclass
class WildJob:
    """One record's WILD generation: its prompts and the edit to add to its rows (empty: the model as is)."""

    spec: WildPrompts
    deltas: list = field(default_factory=list)


def run_wild(
    model: nn.Module, tok, jobs: Sequence[WildJob], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    records_per_batch: int = 8,
) -> list[tuple[dict[str, Any], float]]:
    """:func:`wild_metrics` of every job and its share of the decoding time (s), ``records_per_batch``
    records per decoding batch (decoding on a CPU costs about the same for 3 rows as for 24)."""
    out: list[tuple[dict[str, Any], float]] = []
    k = max(1, records_per_batch)
    for start in range(0, len(jobs), k):
        chunk = jobs[start : start + k]
        t0 = time.perf_counter()
        ids = greedy_continuations(model, tok, [GenerationGroup(j.spec.flat, 0, list(j.deltas)) for j in chunk],
                                   max_new_tokens=max_new_tokens)
        dt = (time.perf_counter() - t0) / len(chunk)
        for job, rows in zip(chunk, ids):
            out.append((wild_metrics(job.spec, [tok.decode(r, skip_special_tokens=True) for r in rows]), dt))
    return out
