"""The algorithm registry: the only list of editing algorithms.

Each algorithm registers once with its hparams class and a ``compute`` function
that returns deltas computed against the model as it is (it must leave the
weights unchanged). :func:`shift_edit.edit` then applies them the same way for
every algorithm, so undo, patches and skipping behave identically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .deltas import WeightDelta
from .errors import ShiftEditError
from .hparams import HyperParams
from .requests import EditRequest


@dataclass
class Computed:
    """What an algorithm's ``compute`` returns.

    Attributes:
        deltas: the weight changes, computed against the model as given.
        skipped: per request, whether it was skipped (target already predicted).
        info: per request, algorithm details worth reporting.
        memory_keys: for algorithms registered with ``uses_memory``: parameter name ->
            ``[n, d_in]`` keys of this edit, appended to the :class:`EditMemory` once the
            deltas are applied.
    """

    deltas: list[WeightDelta]
    skipped: list[bool]
    info: list[dict[str, Any]] = field(default_factory=list)
    memory_keys: dict[str, torch.Tensor] = field(default_factory=dict)


ComputeFn = Callable[..., Computed]
"""``compute(model, tok, requests, hparams)``, plus a keyword ``memory: EditMemory | None`` for
algorithms registered with ``uses_memory=True``."""


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm."""

    name: str
    hparams_class: type[HyperParams]
    compute: ComputeFn
    description: str
    uses_memory: bool = False


_REGISTRY: dict[str, Algorithm] = {}


def register(
    name: str,
    hparams_class: type[HyperParams],
    compute: ComputeFn,
    description: str,
    *,
    uses_memory: bool = False,
) -> Algorithm:
    """Register an algorithm under ``name``; a duplicate name is an error.

    ``uses_memory``: ``compute`` takes a keyword ``memory`` (an :class:`~shift_edit.memory.EditMemory`
    or ``None``) holding the keys of earlier edits, and returns this edit's keys in
    ``Computed.memory_keys``.
    """
    if name in _REGISTRY:
        raise ValueError(f"algorithm {name!r} is already registered")
    if hparams_class.ALG_NAME != name:
        raise ValueError(f"{hparams_class.__name__}.ALG_NAME is {hparams_class.ALG_NAME!r}, not {name!r}")
    alg = Algorithm(name, hparams_class, compute, description, uses_memory)
    _REGISTRY[name] = alg
    return alg


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name, e.g. a list from a YAML file
        raise ShiftEditError(
            f"unknown algorithm {name!r}; registered: {', '.join(algorithm_names())}"
        ) from None


def algorithm_names() -> list[str]:
    """Registered algorithm names, in registration order."""
    return list(_REGISTRY)


def algorithm_for_hparams(hparams: HyperParams) -> Algorithm:
    return get_algorithm(type(hparams).ALG_NAME)
