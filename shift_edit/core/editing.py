"""The generic edit: any registered algorithm, one request format, one result type.

:func:`restore_weights` (ROME's undo from ``orig_weights``) is :func:`shift_edit.core.deltas.restore_weights`.
"""

from __future__ import annotations

import contextlib
import copy as _copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..model.architectures import ModelAdapter
from ..model.resume import first_edited_block
from ..model.stats_pinning import copy_edit_record, note_edit
from .deltas import DEFAULT_MAX_RELATIVE_NORM, apply_deltas, put_back, restore_weights  # noqa: F401 - restore_weights re-exported
from .errors import ShiftEditError
from .guard import check_context, check_outputs
from .hparams import HyperParams
from .memory import EditMemory
from .registry import Computed, algorithm_for_hparams
from .requests import EditRequest, make_requests
from .result import EditResult
from .shipped_hparams import hparams_model_mismatch

RequestLike = Mapping[str, Any] | EditRequest


def edit(
    model: nn.Module,
    tok,
    requests: RequestLike | Iterable[RequestLike],
    hparams: HyperParams,
    *,
    memory: EditMemory | None = None,
    force: bool = False,
) -> EditResult:
    """Edit ``model`` in place with the algorithm ``hparams`` belong to.

    All deltas of a batch of requests are computed against the model as given, then
    summed and added. Calling ``edit`` again on the edited model makes sequential edits;
    undo them in reverse order. Second-moment statistics (ROME, MEMIT, AlphaEdit...) are
    always those of the unedited model: computed once, before the first edit, and reused for
    every later edit of the same model object (:func:`~shift_edit.model.stats_pinning.pinned_statistics`).

    Args:
        model: a Hugging Face causal LM (any entry of the architecture table).
        tok: its tokenizer.
        requests: one request or a list (ROME, CounterFact or EasyEdit format).
        hparams: hparams of a registered algorithm, e.g. :class:`ShiftHyperParams`.
        memory: for sequential (lifelong) editing: the keys of earlier edits, given to
            algorithms that use them (AlphaEdit, SHIFT_PLUS, SHIFT_NEURON) and extended with this edit's
            keys once it is applied. Other algorithms ignore it.
        force: skip the edit guard (:mod:`shift_edit.core.guard`): no bound on the relative
            norm of the deltas, no check that the edit prompts' outputs stay finite.

    Returns:
        An :class:`EditResult`; ``result.undo()`` restores the weights bit-exactly.

    Raises:
        ShiftEditError: bad requests, hparams or model; the model is left unchanged.
        EditRefusedError: the guard refused the edit (a ShiftEditError); the model is unchanged.
    """
    alg = algorithm_for_hparams(hparams)
    reqs = make_requests(requests)
    check_context(model, tok, reqs)
    try:
        if alg.uses_memory:
            computed = alg.compute(model, tok, reqs, hparams, memory=memory)
        else:
            computed = alg.compute(model, tok, reqs, hparams)
    except ShiftEditError as exc:
        note = hparams_model_mismatch(hparams, model)
        if note and note not in str(exc):  # e.g. "layer 35 is out of range" with gpt2-xl hparams on SmolLM2
            raise ShiftEditError(f"{exc} ({note}: pass hparams for this model)") from exc
        raise
    bound = None if force else getattr(hparams, "max_relative_norm", DEFAULT_MAX_RELATIVE_NORM)
    orig: dict[str, torch.Tensor] = {}
    with all_or_nothing(model, orig, memory):  # weights, guard pass, memory, result: all or none
        hashes = apply_deltas(model, computed.deltas, max_relative_norm=bound, orig=orig)[1] if computed.deltas else {}
        if computed.deltas and not force:
            check_outputs(model, tok, [r.text for r in reqs], orig, start=_guard_start(computed, reqs))
        if memory is not None and computed.memory_keys:
            memory.add(computed.memory_keys)
        note_edit(model, orig)  # statistics stay those of the unedited model (stats_pinning.pinned_statistics)
        result = EditResult(
            model=model,
            algorithm=alg.name,
            hparams=hparams,
            requests=reqs,
            deltas=computed.deltas,
            orig_weights=orig,
            base_hashes=hashes,
            skipped=computed.skipped,
            info=computed.info,
            tok=tok,
        )
    return result


def _guard_start(computed: Computed, reqs: list[EditRequest]) -> tuple[ModelAdapter, int, Mapping] | None:
    """Where the guard's pass may start: the first block the deltas change, if the algorithm kept the unedited
    model's input of that block over every edit prompt (:class:`~shift_edit.core.guard.PromptInputs`)."""
    kept = computed.prompt_inputs
    if kept is None:
        return None
    return kept.start(first_edited_block(kept.adapter, computed.deltas), [r.text for r in reqs])


@contextlib.contextmanager
def all_or_nothing(
    model: nn.Module, orig: Mapping[str, torch.Tensor], memory: EditMemory | None = None
) -> Iterator[None]:
    """If the block raises anything (``KeyboardInterrupt`` and out-of-memory errors included),
    copy ``orig`` back bit-exactly and put ``memory`` back as it was, then re-raise: applying the
    weights (``apply_deltas(..., orig=orig)`` fills ``orig`` first), the guard pass, the memory
    and the result happen whole or not at all."""
    saved = memory.snapshot() if memory is not None else None
    try:
        yield
    except BaseException:
        put_back((model.get_parameter(name), w) for name, w in orig.items())  # completes even if interrupted
        if memory is not None:
            memory.restore(saved)
        raise


def apply_algo_to_model(
    model: nn.Module,
    tok,
    requests: RequestLike | Iterable[RequestLike],
    hparams: HyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
) -> tuple[nn.Module, dict]:
    """ROME's contract for any algorithm: ``(edited model, {param name: original tensor})``.

    With ``copy=True`` the model is deep-copied first and the given one is untouched.
    ``orig_weights`` is empty unless ``return_orig_weights``.
    """
    if copy:
        original, model = model, _copy.deepcopy(model)
        copy_edit_record(original, model)
    result = edit(model, tok, requests, hparams)
    return model, (dict(result.orig_weights) if return_orig_weights else {})
