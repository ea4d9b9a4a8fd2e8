"""Teacher-forced scoring of target continuations, batched with right padding.

Everything that asks "how likely is this target after this prompt" goes through
:func:`score_continuations`: the skip check of the editors, the EasyEdit-style
metrics of :class:`~shift_edit.compat.easyedit_editor.BaseEditor` and the CounterFact harness.
Right padding keeps every real token at its unpadded position, so batched and
unbatched results agree (to float round-off in the matmuls).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.requests import encode_prompt, encode_target
from .hooks import head_only_at

if TYPE_CHECKING:
    from .resume import BlockRecorder, Resume


@dataclass
class ContinuationScore:
    """Per-token results of one teacher-forced (prompt, target) pair.

    Attributes:
        target_ids: the target's token ids, length k.
        token_nll: negative log-probability of each target token, shape ``[k]`` (float32).
        token_correct: whether each target token is the argmax at its position, ``[k]``.
        argmax_ids: the argmax token at each target position, ``[k]``.
    """

    target_ids: list[int]
    token_nll: torch.Tensor
    token_correct: torch.Tensor
    argmax_ids: torch.Tensor

    @property
    def mean_nll(self) -> float:
        """Mean token NLL (what ROME's code calls a "prob")."""
        return float(self.token_nll.mean())

    @property
    def all_correct(self) -> bool:
        """Strict top-1: every target token is the argmax (MEMIT's accuracy)."""
        return bool(self.token_correct.all())

    @property
    def first_correct(self) -> bool:
        """First-token-only top-1."""
        return bool(self.token_correct[0])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into ``(input_ids, attention_mask)``, right-padded unless ``left``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tok) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pad is None else int(pad)


@dataclass
class SequencePlan:
    """The fewest token sequences that contain every wanted sequence as a prefix.

    In a causal LM the logits at the positions of a prefix do not depend on what follows
    it, so ``prompt + target[:-1]`` for a one-token target (just the prompt) is read off the
    pass that scores a longer target after the same prompt. ``seqs`` is sorted longest first
    (so batches pad little); ``cover[i]`` is the index of the sequence holding wanted ``i``.
    """

    seqs: list[list[int]]
    cover: list[int]


def plan_prefixes(wanted: Sequence[Sequence[int]]) -> SequencePlan:
    """Plan the forward passes for ``wanted`` sequences (see :class:`SequencePlan`)."""
    order = sorted(range(len(wanted)), key=lambda i: -len(wanted[i]))
    seqs: list[list[int]] = []
    holder: dict[tuple[int, ...], int] = {}
    cover = [0] * len(wanted)
    for i in order:
        key = tuple(wanted[i])
        j = holder.get(key)
        if j is None:
            j = len(seqs)
            seqs.append(list(key))
            for n in range(1, len(key) + 1):
                holder.setdefault(key[:n], j)
        cover[i] = j
    return SequencePlan(seqs, cover)


@torch.no_grad()
def logits_at_positions(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    max_padding: float = 1.0,
    record: BlockRecorder | None = None,
    resume: Resume | None = None,
) -> list[torch.Tensor | None]:
    """Float32 logits ``[len(positions[i]), vocab]`` at the given positions of each sequence.

    Sequences are right-padded into batches of ``batch_size`` in the given order, each batch's
    padding below ``max_padding`` of its tokens (:func:`length_chunks`). Only the
    requested positions go through the output embedding (a pre-hook on it gathers them),
    which saves the head's cost at every other position. ``record`` keeps decoder blocks'
    inputs of each batch (:class:`~shift_edit.model.resume.BlockRecorder`; if it ends the passes
    early, the entries are None); ``resume`` re-runs only the blocks it names, from what was
    recorded for the same sequences and batch size (:class:`~shift_edit.model.resume.Resume`).
    """
    if record is not None and resume is not None:
        raise ValueError("record and resume are two different passes: give one of them")
    device = _device(model)
    out: list[torch.Tensor] = []
    for k, (start, stop) in enumerate(length_chunks([len(x) for x in seqs], batch_size,
                                                                     max_padding=max_padding)):
        chunk, wanted = seqs[start:stop], positions[start:stop]
        ids, mask = pad_batch(chunk, pad_id, device)
        logits = None
        with head_only_at(model, tuple(ids.shape), wanted) as gather:
            with _pass_context(record, resume, k):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if logits is None:  # the recorder ended the pass early
            out.extend([None] * len(wanted))
            continue
        out.extend(gather(logits))
    return out


def _pass_context(record: BlockRecorder | None, resume: Resume | None, k: int) -> contextlib.AbstractContextManager:
    if record is not None:
        return record.batch()
    return resume.batch(k) if resume is not None else contextlib.nullcontext()


def length_chunks(lengths: Sequence[int], batch_size: int, *, max_padding: float = 1.0) -> list[tuple[int, int]]:
    """Split consecutive sequences into batches of at most ``batch_size`` whose padding stays
    below ``max_padding`` of the batch's tokens (with sequences sorted by length, as planned
    ones are, this groups similar lengths and wastes little compute on padding)."""
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        stop, real, width = start + 1, lengths[start], lengths[start]
        while stop < len(lengths) and stop - start < batch_size:
            w = max(width, lengths[stop])
            if w * (stop - start + 1) > (1 + max_padding) * (real + lengths[stop]):
                break
            width, real, stop = w, real + lengths[stop], stop + 1
        chunks.append((start, stop))
        start = stop
    return chunks


@dataclass
class ContinuationPlan:
    """Where each ``(prompt_ids, target_ids)`` pair is read: the planned sequences, the positions
    each sequence must yield logits at, and for each pair (sequence, row offsets of its k positions)."""

    seqs: list[list[int]]
    positions: list[list[int]]
    reads: list[tuple[int, list[int]]]

    @classmethod
    def build(cls, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
              share_prefixes: bool = True) -> "ContinuationPlan":
        wanted = [list(p) + list(t[:-1]) for p, t in pairs]
        if share_prefixes:
            plan = plan_prefixes(wanted)
        else:
            plan = SequencePlan([list(w) for w in wanted], list(range(len(wanted))))
        positions: list[list[int]] = [[] for _ in plan.seqs]
        index: list[dict[int, int]] = [{} for _ in plan.seqs]
        reads = []
        for (p, t), j in zip(pairs, plan.cover):
            rows = []
            for pos in range(len(p) - 1, len(p) - 1 + len(t)):
                if pos not in index[j]:
                    index[j][pos] = len(positions[j])
                    positions[j].append(pos)
                rows.append(index[j][pos])
            reads.append((j, rows))
        return cls(plan.seqs, positions, reads)

    def scores(
        self, logits: Sequence[torch.Tensor], pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list["ContinuationScore"]:
        """Turn :func:`logits_at_positions` output for this plan into one score per pair."""
        out = []
        for (_, t), (j, rows) in zip(pairs, self.reads):
            logp = torch.log_softmax(logits[j][rows], dim=-1)
            tgt = torch.tensor(list(t), device=logp.device)
            nll = -logp.gather(1, tgt[:, None])[:, 0]
            arg = logp.argmax(-1)
            out.append(ContinuationScore(list(t), nll.cpu(), (arg == tgt).cpu(), arg.cpu()))
        return out


def score_token_continuations(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    share_prefixes: bool = True,
    record: BlockRecorder | None = None,
    resume: Resume | None = None,
) -> list[ContinuationScore]:
    """Score ``(prompt_ids, target_ids)`` pairs under teacher forcing.

    The prompt is followed by all target tokens but the last; the logits at the
    positions ``len(prompt)-1 .. len(prompt)+k-2`` predict the k target tokens.
    With ``share_prefixes`` (default) pairs whose input is a prefix of another pair's
    input are read off that pair's forward pass (:func:`plan_prefixes`); the values equal
    the one-pass-per-pair path (``share_prefixes=False, batch_size=1``) to float round-off.
    ``record`` (one that does not stop the passes) / ``resume``: keep blocks' inputs, re-run
    only some blocks (see :func:`logits_at_positions`).
    """
    if not pairs:
        return []
    plan = ContinuationPlan.build(pairs, share_prefixes=share_prefixes)
    logits = logits_at_positions(model, plan.seqs, plan.positions, pad_id=pad_id, batch_size=batch_size,
                                 record=record, resume=resume)
    return plan.scores(logits, pairs)


def score_continuations(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    record: BlockRecorder | None = None,
    resume: Resume | None = None,
) -> list[ContinuationScore]:
    """Score text ``(prompt, target)`` pairs; targets should carry their leading space
    (``record`` / ``resume``: see :func:`score_token_continuations`)."""
    pairs = [(encode_prompt(tok, p), encode_target(tok, p, t)) for p, t in zip(prompts, targets)]
    return score_token_continuations(model, pairs, pad_id=pad_id_of(tok), batch_size=batch_size,
                                     record=record, resume=resume)


@torch.no_grad()
def next_token_topk(model: nn.Module, tok, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most probable next tokens after ``prompt`` with their probabilities."""
    ids = torch.tensor([encode_prompt(tok, prompt)], device=_device(model))
    probs = model(input_ids=ids, use_cache=False).logits[0, -1].float().softmax(-1)
    values, indices = probs.topk(k)
    return [(tok.decode([int(i)]), float(v)) for v, i in zip(values, indices)]
