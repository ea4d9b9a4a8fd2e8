"""Statistics are always the unedited model's: which weights a model's statistics (and generic samples) are keyed
by, and running a computation on those weights when the model has been edited since.

:func:`~shift_edit.core.editing.edit` notes each edit (:func:`note_edit`), so the values its parameters had before
their first edit are known; :func:`pinned_statistics` pins a model's statistics to its weights as they are now
(``bench --sequential`` pins the unedited model before it loads a saved state).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..core.deltas import swapped_weights
from ..core.errors import ShiftEditError
from ..files.io import model_fingerprint

#: models whose statistics are pinned to an earlier state of their weights (see :func:`pinned_statistics`)
_PINNED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


#: models edited with :func:`shift_edit.edit`: each edited parameter's value before its first edit (on the CPU)
_UNEDITED: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def pinned_statistics(model: nn.Module, fingerprint: str | None = None) -> Iterator[str]:
    """While active, :func:`layer_stats` of ``model`` reads (or builds) the statistics of the model
    as it is now (or of the weights with ``fingerprint``), however its weights change meanwhile.

    The statistics policy (the same in the API and the CLI): ``C`` stands for the knowledge to preserve,
    i.e. the unedited model's keys (as ROME/MEMIT/AlphaEdit compute it once), and recomputing it for every
    edited state would cost a corpus pass per edit. So statistics are always those of the unedited model:
    without this context, of the model's weights before its first edit through :func:`shift_edit.edit`
    (which every editing path uses: ``BaseEditor(sequential_edit=True)``, ``apply_*_to_model`` in a loop,
    ``se.edit`` with an ``EditMemory``; see :func:`statistics_fingerprint`); this context pins them to the
    weights as they are now instead (``bench --sequential`` pins the unedited model before it loads a saved
    state). Yields the pinned fingerprint.
    """
    fp = fingerprint or model_fingerprint(model)
    before = _PINNED.get(model)
    _PINNED[model] = fp
    try:
        yield fp
    finally:
        if before is None:
            _PINNED.pop(model, None)
        else:
            _PINNED[model] = before


def note_edit(model: nn.Module, orig_weights: dict[str, torch.Tensor]) -> None:
    """Remember the values the parameters an edit just changed had before (those changed for the first time),
    so that statistics stay pinned to the unedited model (:func:`statistics_fingerprint`). Called by
    :func:`shift_edit.edit` after it applied an edit."""
    unedited = _UNEDITED.setdefault(model, {})
    for name, value in orig_weights.items():
        if name not in unedited:
            unedited[name] = value.detach().to("cpu", copy=True)


def copy_edit_record(src: nn.Module, dst: nn.Module) -> None:
    """``dst`` (a copy of ``src``) has the unedited model of ``src`` (``apply_*_to_model(copy=True)``)."""
    if src in _UNEDITED:
        _UNEDITED[dst] = dict(_UNEDITED[src])
    if src in _PINNED:
        _PINNED[dst] = _PINNED[src]


def unedited_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unedited values of the parameters whose current value differs (entries undone since are forgotten)."""
    unedited = _UNEDITED.get(model)
    if not unedited:
        return {}
    with torch.no_grad():
        for name in [n for n, v in unedited.items() if torch.equal(model.get_parameter(n).detach().cpu(), v)]:
            del unedited[name]
    return dict(unedited)


def statistics_fingerprint(model: nn.Module) -> str:
    """The weights ``model``'s statistics (and generic samples) are keyed by: the pinned ones
    (:func:`pinned_statistics`), else the model's with every parameter changed by :func:`shift_edit.edit`
    at its value before its first edit, i.e. the unedited model."""
    pinned = _PINNED.get(model)
    return pinned if pinned is not None else model_fingerprint(model, overrides=unedited_values(model))


@contextlib.contextmanager
def on_weights(model: nn.Module, fingerprint: str, what: str, hint: str = "") -> Iterator[None]:
    """The block runs on the weights with ``fingerprint`` (the unedited values of edited parameters swapped
    in, bit-exactly back afterwards); refused when the model has changed in a way that cannot be undone here."""
    if model_fingerprint(model) == fingerprint:
        yield
        return
    unedited = unedited_values(model)
    if unedited and model_fingerprint(model, overrides=unedited) == fingerprint:
        with swapped_weights(model, unedited):
            yield
        return
    raise ShiftEditError(f"{what}: pinned to the weights {fingerprint} but not cached, and the model has changed "
                         f"since: compute it before editing{hint}")
