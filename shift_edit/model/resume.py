"""Re-run only the decoder blocks an edit changed.

An edit that changes blocks ``L`` and later leaves blocks ``0 .. L-1`` computing exactly what
they computed before. A :class:`BlockRecorder` keeps the input hidden states of chosen blocks
during forward passes of the unedited model, one entry per batch; a :class:`Resume` (what
:meth:`BlockRecorder.resume_after` returns for an edit's deltas, or ``None``: run the whole
model) then runs the *same batches* through blocks ``L ..`` only, feeding block ``L`` its
recorded input. The result equals a full forward pass of the edited model on those batches
(the same operations on the same inputs) at ``(n_layers - L) / n_layers`` of the blocks' cost.
The embeddings still run (their output is discarded), so positions, masks and rotary tables
are built by the model's own code.

The first edited block is read off the deltas (:attr:`~shift_edit.core.deltas.WeightDelta.layer`,
set by every algorithm from its hparams), never parsed back out of module paths.

Models that index per-layer settings by loop position (e.g. alternating sliding-window
layers) could see the wrong setting in a truncated block list; callers verify once against a
full pass (the benchmark runner does, with an allclose check).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .architectures import ModelAdapter
from .hooks import StopForward, owned_hooks

if TYPE_CHECKING:
    from ..core.deltas import WeightDelta


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def record_block_inputs(adapter: ModelAdapter, *, stop_at: int | None = None) -> Iterator[list[torch.Tensor | None]]:
    """Record each decoder block's input hidden states during the forward pass in the block.

    Yields a list with one entry per block (filled as the pass runs; None if a block did not
    run). With ``stop_at`` the pass ends once block ``stop_at``'s input is recorded (the rest
    of the ``with`` body is skipped, as in :func:`~shift_edit.model.hooks.capture_inputs`).
    """
    blocks = list(adapter.blocks())
    seen: list[torch.Tensor | None] = [None] * len(blocks)

    def make(i: int):
        def hook(_module, args, kwargs):
            seen[i] = _hidden(args, kwargs).detach()
            if i == stop_at:
                raise StopForward

        return hook

    with owned_hooks() as hooks:
        for i, block in enumerate(blocks):
            hooks.forward_pre_hook(block, make(i), with_kwargs=True)
        try:
            yield seen
        except StopForward:
            pass


@contextlib.contextmanager
def resume_at(adapter: ModelAdapter, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, forward passes skip blocks ``< layer`` and feed ``hidden`` to block ``layer``.

    ``hidden`` must be block ``layer``'s input recorded (:func:`record_block_inputs`) for the
    same batch. The block list is restored on exit, whatever happens.
    """
    container = adapter.blocks()
    saved = container._modules
    kept = list(saved.values())[layer:]

    def feed(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with owned_hooks() as hooks:
        hooks.forward_pre_hook(kept[0], feed, with_kwargs=True)
        container._modules = OrderedDict((str(j), m) for j, m in enumerate(kept))
        try:
            yield
        finally:
            container._modules = saved


def first_edited_block(adapter: ModelAdapter, deltas: Iterable[WeightDelta]) -> int | None:
    """The lowest decoder block the deltas change (their ``layer``); None when there are none or
    a delta names no layer (a matrix outside the blocks, an old patch): nothing can be skipped."""
    layers = [d.layer for d in deltas]
    if not layers or any(layer is None for layer in layers):
        return None
    return min(adapter.check_layer(int(layer)) for layer in layers)


@dataclass(frozen=True, eq=False)
class Resume:
    """Which blocks a sequence of forward passes re-runs: ``block`` and later, block ``block``
    fed ``hidden[k]`` (its input recorded on the unedited model) in the ``k``-th pass.

    ``None`` in its place means: run the whole model. Made by :meth:`BlockRecorder.resume_after`
    (or :meth:`BlockRecorder.resume_at`); the passes must be the recorded ones, in the same order.
    """

    adapter: ModelAdapter
    block: int
    hidden: tuple[torch.Tensor, ...]

    def batch(self, k: int = 0) -> contextlib.AbstractContextManager:
        """The context in which the ``k``-th pass re-runs blocks ``block ..`` only."""
        return resume_at(self.adapter, self.block, self.hidden[k])


class BlockRecorder:
    """Keeps the input of ``blocks`` (an index, several, or None: every block) in each forward
    pass of the unedited model run inside :meth:`batch`, one entry per pass, in order.

    With ``stop=True`` each pass ends once the highest kept block's input is recorded: the
    pass yields no logits (the caller only wanted the recording).
    """

    def __init__(self, adapter: ModelAdapter, blocks: int | Sequence[int] | None = None, *, stop: bool = False) -> None:
        n = adapter.n_layers
        if blocks is None:
            keep = tuple(range(n))
        elif isinstance(blocks, int):
            keep = (adapter.check_layer(blocks),)
        else:
            keep = tuple(sorted({adapter.check_layer(int(b)) for b in blocks}))
        self.adapter = adapter
        self.blocks = keep
        self.stop = stop
        self.passes: list[dict[int, torch.Tensor | None]] = []

    def __len__(self) -> int:
        return len(self.passes)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Record one forward pass run in the block (ended early, without error, if ``stop``)."""
        with record_block_inputs(self.adapter, stop_at=max(self.blocks) if self.stop else None) as seen:
            yield
        self.passes.append({b: seen[b] for b in self.blocks})

    def add_pass(self, hidden: dict[int, torch.Tensor | None]) -> None:
        """Keep the kept blocks' inputs of one pass recorded elsewhere (e.g. rows of a larger batch,
        :mod:`shift_edit.bench.packing`); the next pass to resume from them must have their shape."""
        if set(hidden) != set(self.blocks):
            raise ValueError(f"a pass of blocks {sorted(hidden)} given to a recorder of blocks {list(self.blocks)}")
        self.passes.append(dict(hidden))

    def resume_at(self, block: int) -> Resume | None:
        """Re-run from ``block`` (a kept one), or None if some recorded pass did not reach it."""
        hidden = [p.get(block) for p in self.passes]
        if block not in self.blocks or any(h is None for h in hidden):
            return None
        return Resume(self.adapter, block, tuple(hidden))

    def resume_after(self, deltas: Iterable[WeightDelta]) -> Resume | None:
        """The shortcut for the model the ``deltas`` edited: re-run from the highest kept block
        not after the first edited one; None (the whole model) when no kept block qualifies."""
        first = first_edited_block(self.adapter, deltas)
        usable = [b for b in self.blocks if first is not None and b <= first]
        return self.resume_at(max(usable)) if usable else None
