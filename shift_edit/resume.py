"""Re-run only the decoder blocks an edit changed.

An edit that changes blocks ``L`` and later leaves blocks ``0 .. L-1`` computing exactly what
they computed before. :func:`record_block_inputs` keeps every block's input hidden states
during a forward pass of the unedited model; :func:`resume_at` then runs the *same batch*
through blocks ``L ..`` only, feeding block ``L`` its recorded input. The result equals a full
forward pass of the edited model on that batch (the same operations on the same inputs) at
``(n_layers - L) / n_layers`` of the blocks' cost. The embeddings still run (their output is
discarded), so positions, masks and rotary tables are built by the model's own code.

Models that index per-layer settings by loop position (e.g. alternating sliding-window
layers) could see the wrong setting in a truncated block list; callers verify once against a
full pass (:func:`first_changed_block` + an allclose check in the benchmark runner).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch

from .architectures import ModelAdapter
from .hooks import StopForward


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def record_block_inputs(adapter: ModelAdapter, *, stop_at: int | None = None) -> Iterator[list[torch.Tensor | None]]:
    """Record each decoder block's input hidden states during the forward pass in the block.

    Yields a list with one entry per block (filled as the pass runs; None if a block did not
    run). With ``stop_at`` the pass ends once block ``stop_at``'s input is recorded (the rest
    of the ``with`` body is skipped, as in :func:`~shift_edit.hooks.capture_inputs`).
    """
    blocks = list(adapter.blocks())
    seen: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []

    def make(i: int):
        def hook(_module, args, kwargs):
            seen[i] = _hidden(args, kwargs).detach()
            if i == stop_at:
                raise StopForward

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(make(i), with_kwargs=True))
        try:
            yield seen
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


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

    handle = kept[0].register_forward_pre_hook(feed, with_kwargs=True)
    container._modules = OrderedDict((str(j), m) for j, m in enumerate(kept))
    try:
        yield
    finally:
        container._modules = saved
        handle.remove()


def first_changed_block(adapter: ModelAdapter, modules: Iterable[str]) -> int | None:
    """The lowest decoder block touched by ``modules`` (module paths); None when any module lies
    outside the blocks (embeddings, final norm, head), i.e. when nothing can be skipped."""
    layers = [adapter.block_of(m) for m in modules]
    if not layers or any(layer is None for layer in layers):
        return None
    return min(layers)
