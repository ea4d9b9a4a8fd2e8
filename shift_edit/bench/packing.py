"""Several records' passes on the unedited model in shared batches (issue 33, target 3).

A single-edit run scores each record on its own edited model, but the passes it makes on the
*unedited* model -- the whole measurement of the unedited row (NONE) and, before each edit, the
neighborhood distributions (the KL reference) and the input of the first edited block (what the
edited pass resumes from) -- are the same model's for every record. :func:`packed_logits` runs the
sequences of many records' :class:`~shift_edit.model.scoring.ContinuationPlan` parts as one set of
right-padded batches sorted by length across records: little padding (at most
:data:`PACK_MAX_PADDING` of a batch's tokens) and larger matrix products than one record fills.
:func:`recorder_for` re-batches one part's recorded block inputs the way that part's own edited
pass (:func:`~shift_edit.model.scoring.logits_at_positions`) batches its sequences.

The values equal the one-record-at-a-time passes up to the float round-off of differently shaped
matrix products: every row holds the same tokens at the same positions, and padding is masked
(``tests/test_fast_scoring.py`` checks record by record against the per-record path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model.architectures import ModelAdapter
from ..model.resume import BlockRecorder
from ..model.scoring import length_chunks, logits_at_positions
from .metrics import CaseScorer

#: padding allowed in a packed batch, as a fraction of its tokens (sorted across records, lengths repeat often)
PACK_MAX_PADDING = 0.1


@dataclass
class PartPasses:
    """One part's sequences and the positions whose logits it wants (a record's plan, or fewer positions)."""

    seqs: Sequence[Sequence[int]]
    positions: Sequence[Sequence[int]]


@dataclass
class Packed:
    """What :func:`packed_logits` returns, per part and per sequence of that part.

    Attributes:
        logits: float32 ``[len(positions), vocab]`` per sequence, or None when the passes stopped early.
        hidden: the recorded block's input, ``[len(seq), d_model]`` per sequence (None: nothing recorded).
    """

    logits: list[list[torch.Tensor | None]]
    hidden: list[list[torch.Tensor]] | None


@torch.no_grad()
def packed_logits(
    model: nn.Module,
    parts: Sequence[PartPasses],
    *,
    pad_id: int,
    batch_size: int,
    adapter: ModelAdapter | None = None,
    block: int | None = None,
    stop: bool = False,
) -> Packed:
    """Logits at the wanted positions of every part's sequences, all parts' sequences in shared batches.

    Args:
        parts: the parts (e.g. the ``near`` part of each of several records).
        pad_id / batch_size: as in :func:`~shift_edit.model.scoring.logits_at_positions`.
        adapter / block: also keep decoder block ``block``'s input of every sequence.
        stop: end each pass once that input is recorded (no logits).
    """
    if stop and block is None:
        raise ValueError("stop=True needs a block to record")
    flat = [(i, j) for i, part in enumerate(parts) for j in range(len(part.seqs))]
    order = sorted(range(len(flat)), key=lambda n: -len(parts[flat[n][0]].seqs[flat[n][1]]))
    seqs = [parts[flat[n][0]].seqs[flat[n][1]] for n in order]
    positions = [parts[flat[n][0]].positions[flat[n][1]] for n in order]
    recorder = None
    if block is not None:
        if adapter is None:
            raise ValueError("recording a block needs the model's adapter")
        recorder = BlockRecorder(adapter, block, stop=stop)
    logits = logits_at_positions(model, seqs, positions, pad_id=pad_id, batch_size=batch_size,
                                 max_padding=PACK_MAX_PADDING, record=recorder)
    out: list[list[torch.Tensor | None]] = [[None] * len(part.seqs) for part in parts]
    for n, lg in zip(order, logits):
        i, j = flat[n]
        out[i][j] = lg
    if recorder is None:
        return Packed(out, None)
    hidden: list[list] = [[None] * len(part.seqs) for part in parts]
    chunks = length_chunks([len(s) for s in seqs], batch_size, max_padding=PACK_MAX_PADDING)
    for (start, end), recorded in zip(chunks, recorder.passes):
        h = recorded[recorder.blocks[0]]
        for row in range(end - start):
            i, j = flat[order[start + row]]
            hidden[i][j] = h[row, : len(seqs[start + row])]
    return Packed(out, hidden)


def recorder_for(adapter: ModelAdapter, block: int, seqs: Sequence[Sequence[int]], rows: Sequence[torch.Tensor],
                 batch_size: int) -> BlockRecorder:
    """A recorder holding block ``block``'s input for ``seqs`` (one ``[len, d]`` row each, e.g. from
    :func:`packed_logits`) batched as :func:`~shift_edit.model.scoring.logits_at_positions` batches ``seqs``
    with ``batch_size`` (its default padding bound: one record's few sequences run fastest in few batches, a
    tighter bound measured slower), ready for :meth:`BlockRecorder.resume_after`.
    Padded positions hold zeros: causal attention with the padding mask never reads them at a real position."""
    recorder = BlockRecorder(adapter, block)
    for start, end in length_chunks([len(s) for s in seqs], batch_size):
        chunk = rows[start:end]
        h = chunk[0].new_zeros((len(chunk), max(r.shape[0] for r in chunk), chunk[0].shape[-1]))
        for k, r in enumerate(chunk):
            h[k, : r.shape[0]] = r
        recorder.add_pass({block: h})
    return recorder


@dataclass
class Unedited:
    """One record's share of the packed passes on the unedited model.

    Attributes:
        scores: the unedited row's whole measurement (:meth:`CaseScorer.scores`), or None before an edit.
        recorders: per part, the input of the first edited block, batched for the part's edited pass (empty:
            nothing to skip).
        pre_logp: the unedited next-token log-probabilities after each neighborhood prompt (the KL reference).
    """

    scores: dict | None
    recorders: dict[str, BlockRecorder]
    pre_logp: torch.Tensor | None


def unedited_passes(
    model: nn.Module,
    scorers: Sequence[CaseScorer],
    *,
    batch_size: int,
    full: bool,
    adapter: ModelAdapter | None = None,
    block: int | None = None,
    kl: bool = True,
) -> list[Unedited]:
    """The passes several records make on the unedited model, in shared batches.

    ``full``: the unedited row -- every record's scores. Otherwise what the runner keeps before each record's
    edit: with ``kl``, the neighborhood distributions (read at each neighborhood prompt's last token only);
    with ``block`` (> 0), the input of that block for every sequence of both parts (the passes of the ``edit``
    part, and of ``near`` without ``kl``, stop there).
    """
    if not scorers:
        return []
    pad_id = scorers[0].pad_id
    if full:
        every = [PartPasses(s.parts[p].plan.seqs, s.parts[p].plan.positions) for s in scorers for p in CaseScorer.PARTS]
        packed = packed_logits(model, every, pad_id=pad_id, batch_size=batch_size)
        logits = iter(packed.logits)
        return [Unedited(s.scores({p: next(logits) for p in CaseScorer.PARTS}), {}, None) for s in scorers]
    block = block or None  # block 0: nothing to skip
    kl_of = [kl and s.n_neighborhood > 0 for s in scorers]
    out = [Unedited(None, {}, None) for _ in scorers]
    if any(kl_of) or block is not None:
        wanted: list[list[list[int]]] = []
        for s, on in zip(scorers, kl_of):
            pos: list[list[int]] = [[] for _ in s.parts["near"].plan.seqs]
            for j, p in s.neighborhood_ends() if on else ():
                if p not in pos[j]:
                    pos[j].append(p)
            wanted.append(pos)
        near = packed_logits(model, [PartPasses(s.parts["near"].plan.seqs, w) for s, w in zip(scorers, wanted)],
                             pad_id=pad_id, batch_size=batch_size, adapter=adapter, block=block, stop=not any(kl_of))
        for k, (s, on) in enumerate(zip(scorers, kl_of)):
            if on:
                rows = [near.logits[k][j][wanted[k][j].index(p)] for j, p in s.neighborhood_ends()]
                out[k].pre_logp = torch.log_softmax(torch.stack(rows), dim=-1).cpu()
    if block is not None:
        edit = packed_logits(model, [PartPasses(s.parts["edit"].plan.seqs, [[] for _ in s.parts["edit"].plan.seqs])
                                     for s in scorers], pad_id=pad_id, batch_size=batch_size, adapter=adapter,
                             block=block, stop=True)
        for k, s in enumerate(scorers):
            out[k].recorders = {
                part: recorder_for(adapter, block, s.parts[part].plan.seqs, packed.hidden[k], batch_size)
                for part, packed in (("near", near), ("edit", edit))}
    return out
