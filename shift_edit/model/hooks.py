"""Forward hooks we own: register, record the handles, remove exactly those.

:func:`owned_hooks` is the one way hooks are registered in this package: a context manager
whose :class:`OwnedHooks` registers hooks, keeps their handles and removes exactly those when
the block ends (also on an error); hooks it did not add are never touched.

:func:`capture_inputs` records the input of named modules during one forward
pass. With ``stop_after`` the forward pass is cut short right after that module
ran, since nothing later is needed (the forward pass shift only needs FF2's input).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class OwnedHooks:
    """The hooks registered through this object (see :func:`owned_hooks`)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Own a handle registered elsewhere: it is removed with the others."""
        self._handles.append(handle)
        return handle

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs) -> RemovableHandle:
        """``module.register_forward_hook(hook, **kwargs)``, owned."""
        return self.add(module.register_forward_hook(hook, **kwargs))

    def forward_pre_hook(self, module: nn.Module, hook: Callable, **kwargs) -> RemovableHandle:
        """``module.register_forward_pre_hook(hook, **kwargs)``, owned."""
        return self.add(module.register_forward_pre_hook(hook, **kwargs))

    def remove(self, handle: RemovableHandle) -> None:
        """Remove one owned hook now."""
        self._handles.remove(handle)
        handle.remove()

    def remove_all(self) -> None:
        """Remove every owned hook, in the order they were added."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def owned_hooks() -> Iterator[OwnedHooks]:
    """Register hooks for the duration of a block::

        with owned_hooks() as hooks:
            hooks.forward_hook(module, fn)
            model(...)

    Every hook added through ``hooks`` is removed when the block ends, also on an error."""
    hooks = OwnedHooks()
    try:
        yield hooks
    finally:
        hooks.remove_all()


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; caught by :func:`capture_inputs`."""


@dataclass
class Captured:
    """Activations recorded by :func:`capture_inputs`.

    ``inputs[name]`` is the module's first positional input, detached, shape
    ``[batch, seq, d_in]``, on the model's device and in its dtype.
    """

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    stopped_early: bool = False


@contextlib.contextmanager
def capture_inputs(
    model: nn.Module, names: Sequence[str], *, stop_after: str | None = None
) -> Iterator[Captured]:
    """Record the inputs of the modules ``names`` while the ``with`` block runs a forward pass.

    Args:
        model: the model whose submodules are hooked.
        names: module paths (``model.get_submodule`` names).
        stop_after: a module path among ``names``; once every module in ``names`` has
            been reached, the forward pass is aborted and the rest of the ``with`` body is
            skipped (use :func:`forward_capture` for the common call-and-capture case).

    Yields:
        A :class:`Captured` filled in as the forward pass runs.
    """
    captured = Captured()

    def make_hook(name: str):
        def hook(_module, args):
            captured.inputs[name] = args[0].detach()
            if name == stop_after and all(n in captured.inputs for n in names):
                captured.stopped_early = True
                raise StopForward

        return hook

    with owned_hooks() as hooks:
        for name in names:
            hooks.forward_pre_hook(model.get_submodule(name), make_hook(name))
        try:
            yield captured
        except StopForward:
            pass


def forward_capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    names: Sequence[str],
    *,
    stop_after: str | None = None,
    head_positions: Sequence[Sequence[int]] | None = None,
) -> tuple[Captured, torch.Tensor | list[torch.Tensor] | None]:
    """Run one forward pass under ``no_grad`` and capture the inputs of ``names``.

    Captured inputs are always ``[batch, seq, d_in]``, also for models that flatten
    tokens inside the MLP.

    Returns:
        The captured inputs and the logits ``[batch, seq, vocab]`` -- or, with
        ``head_positions``, one ``[len(head_positions[row]), vocab]`` tensor per row (the
        head runs only there) -- or ``None`` when the pass was stopped early at ``stop_after``.
    """
    logits = None
    head = head_only_at(model, tuple(input_ids.shape), head_positions) if head_positions is not None else None
    with torch.no_grad(), head if head is not None else contextlib.nullcontext() as gather:
        with capture_inputs(model, names, stop_after=stop_after) as captured:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if logits is not None and head is not None:
            logits = gather(logits)
    batch, seq = input_ids.shape
    for name, x in captured.inputs.items():
        if x.ndim == 2:  # OPT flattens [batch, seq, d] to [batch * seq, d] inside its MLP
            captured.inputs[name] = x.view(batch, seq, -1)
    return captured, (None if captured.stopped_early else logits)


@contextlib.contextmanager
def head_only_at(model: nn.Module, shape: tuple[int, int], positions: Sequence[Sequence[int]]):
    """Run the output embedding only at ``positions[row]`` of a ``[batch, seq]`` forward pass.

    A pre-hook on the output embedding gathers the wanted hidden states (saving the head's
    cost everywhere else). Yields ``gather(logits)`` -> one float32 ``[len(positions[row]),
    vocab]`` tensor per row; if the hook did not apply (an unusual head input), it reads the
    same rows off the full logits.
    """
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    rows = torch.tensor([r for r, pos in enumerate(positions) for _ in pos], dtype=torch.long, device=device)
    cols = torch.tensor([c for pos in positions for c in pos], dtype=torch.long, device=device)
    picked = []

    def pick(_module, args):
        h = args[0]
        if h.dim() == 3 and tuple(h.shape[:2]) == tuple(shape):
            picked.append(True)
            return (h[rows, cols][None], *args[1:])
        return None

    def gather(logits: torch.Tensor) -> list[torch.Tensor]:
        flat = (logits[0] if picked else logits[rows, cols]).float()
        out, n = [], 0
        for pos in positions:
            out.append(flat[n : n + len(pos)])
            n += len(pos)
        return out

    handle = head.register_forward_pre_hook(pick) if head is not None else None
    try:
        yield gather
    finally:
        if handle is not None:
            handle.remove()
