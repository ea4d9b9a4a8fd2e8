"""The algorithm registry: the only list of editing algorithms, and everything known about each.

Each algorithm registers once with its hparams class and a ``compute`` function
that returns deltas computed against the model as it is (it must leave the
weights unchanged). :func:`shift_edit.edit` then applies them the same way for
every algorithm, so undo, patches and skipping behave identically.

The :class:`Algorithm` record is where the CLI, the studies, the EasyEdit facade and the
benchmark read what they need to know about an algorithm: its hparams class and step-size
field, whether its delta is linear in that step, which algorithm-specific ``shift-edit edit``
options apply to it (with their help; the choices come from the field's type), how a run's hparams are
told apart in summaries (``describe``), and where its shipped hparams files are. Nothing outside the
registry and the algorithm modules names an algorithm to decide what to do.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from .deltas import WeightDelta
from .errors import ShiftEditError
from .guard import PromptInputs
from .hparams import HyperParams, read_yaml
from .shipped_hparams import shipped_hparams as _shipped_hparams


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
        prompt_inputs: the unedited model's block inputs over the edit prompts, if the algorithm's own pass
            recorded them: the guard's pass then starts at the first edited block.
    """

    deltas: list[WeightDelta]
    skipped: list[bool]
    info: list[dict[str, Any]] = field(default_factory=list)
    memory_keys: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_inputs: PromptInputs | None = None


ComputeFn = Callable[..., Computed]
"""``compute(model, tok, requests, hparams)``, plus a keyword ``memory: EditMemory | None`` for
algorithms registered with ``uses_memory=True``."""

DescribeFn = Callable[[Mapping[str, Any]], list[str]]
"""``describe(hparams)``: short tags telling runs of one algorithm apart in summaries (``["L5", "eta 0.1"]``),
read from an hparams *dict* (a run's ``params.json``, possibly written by an older version or another toolkit:
absent fields give no tag)."""


def tag_layers(hp: Mapping[str, Any]) -> list[str]:
    """``["L3,4"]`` from ``layers``."""
    return ["L" + ",".join(str(x) for x in hp["layers"])] if hp.get("layers") is not None else []


def tag_value(hp: Mapping[str, Any], key: str, label: str | None = None, suffix: str = "") -> list[str]:
    """``["<label> <value:g><suffix>"]`` when ``key`` is set (``label`` defaults to the key)."""
    return [f"{label or key} {hp[key]:g}{suffix}"] if hp.get(key) is not None else []


def tag_statistics(hp: Mapping[str, Any]) -> list[str]:
    """``["C 50k tok"]``: the tokens of the FF2 key statistics, when they are used."""
    if hp.get("mom2_n_tokens") is not None and hp.get("mom2_adjustment", True):
        return [f"C {hp['mom2_n_tokens'] / 1000:g}k tok"]
    return []


def describe_basics(step_field: str | None) -> DescribeFn:
    """The default ``describe``: the layers, the step size and the statistics."""
    return lambda hp: tag_layers(hp) + (tag_value(hp, step_field) if step_field else []) + tag_statistics(hp)


@dataclass(frozen=True)
class CliOption:
    """An algorithm-specific ``shift-edit edit`` option: the hparams field it sets, its choices (from the
    field's ``Literal`` type, else None), its help and the algorithms that take it."""

    field: str
    choices: tuple[Any, ...] | None
    help: str
    owners: tuple[str, ...]


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    Attributes:
        name: the registry name (``hparams_class.ALG_NAME``).
        hparams_class: its :class:`HyperParams` dataclass.
        compute: ``compute(model, tok, requests, hparams)`` -> :class:`Computed`.
        description: one line for people (``shift-edit models``, docs).
        uses_memory: ``compute`` takes ``memory=`` and returns ``Computed.memory_keys``.
        linear_step: the delta is linear in the step size (one step, no iteration), so a
            delta computed at step 1 can be scaled (the minimum-step study relies on it).
        cli_options: hparams field -> help, for fields with their own ``shift-edit edit`` option beyond
            the ones every algorithm takes (``--layer``, ``--eta`` for the step field, ``--no-skip``),
            e.g. ``{"eta_scaling": "raw (paper) or normalized by ||x_n||^2"}`` for ``--eta-scaling``.
        describe: ``describe(hparams dict)`` -> tags telling its runs apart (:data:`DescribeFn`); the default
            (:func:`describe_basics`) gives the layers, the step size and the statistics.
        prime: ``prime(model, tok, hparams)`` reads (or computes) everything the algorithm derives from the
            unedited model beyond the FF2 statistics, so that a sequential run can pin it before its first edit.
    """

    name: str
    hparams_class: type[HyperParams]
    compute: ComputeFn
    description: str
    uses_memory: bool = False
    linear_step: bool = False
    cli_options: Mapping[str, str] = field(default_factory=dict, hash=False)
    prime: Callable[..., None] | None = None
    describe: DescribeFn | None = field(default=None, hash=False, compare=False)

    @property
    def step_field(self) -> str | None:
        """The hparams field holding the step size (the class's ``STEP_FIELD``: SHIFT's ``eta``,
        the gradient baselines' ``lr``), set by ``--eta`` and searched by ``--until-top1``; None
        when the algorithm has no single step size."""
        return getattr(self.hparams_class, "STEP_FIELD", None)

    def shipped_hparams(self, model: str, variant: str | None = None) -> Path | None:
        """The shipped ``hparams/<ALG>/<model>.yaml`` of this algorithm for ``model``, or None."""
        return _shipped_hparams(self.name, model, variant)


_REGISTRY: dict[str, Algorithm] = {}


def register(
    name: str,
    hparams_class: type[HyperParams],
    compute: ComputeFn,
    description: str,
    *,
    uses_memory: bool = False,
    linear_step: bool = False,
    cli_options: Mapping[str, str] | None = None,
    prime: Callable[..., None] | None = None,
    describe: DescribeFn | None = None,
) -> Algorithm:
    """Register an algorithm under ``name``; a duplicate name is an error.

    ``uses_memory``: ``compute`` takes a keyword ``memory`` (an :class:`~shift_edit.core.memory.EditMemory`
    or ``None``) holding the keys of earlier edits, and returns this edit's keys in
    ``Computed.memory_keys``. ``linear_step``: the delta is linear in the step size (needs a
    ``STEP_FIELD`` on the hparams class). ``cli_options`` (field -> help), ``prime`` and ``describe``: see
    :class:`Algorithm`.
    """
    if name in _REGISTRY:
        raise ValueError(f"algorithm {name!r} is already registered")
    if hparams_class.ALG_NAME != name:
        raise ValueError(f"{hparams_class.__name__}.ALG_NAME is {hparams_class.ALG_NAME!r}, not {name!r}")
    fields = {f.name for f in dataclasses.fields(hparams_class)}
    step = getattr(hparams_class, "STEP_FIELD", None)
    if step is not None and step not in fields:
        raise ValueError(f"{hparams_class.__name__}.STEP_FIELD is {step!r}, not one of its fields")
    if linear_step and step is None:
        raise ValueError(f"{name}: linear_step needs a STEP_FIELD on {hparams_class.__name__}")
    cli_options = dict(cli_options or {})
    unknown = sorted(set(cli_options) - fields)
    if unknown:
        raise ValueError(f"{name}: cli_options {unknown} are not fields of {hparams_class.__name__}")
    alg = Algorithm(name, hparams_class, compute, description, uses_memory, linear_step, cli_options, prime,
                    describe or describe_basics(step))
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


def linear_step_fields() -> dict[str, str]:
    """``{name: step field}`` of the algorithms whose delta is linear in the step, in registration order."""
    return {a.name: a.step_field for a in _REGISTRY.values() if a.linear_step and a.step_field is not None}


def option_owners(option: str) -> list[str]:
    """The algorithms that list the hparams field ``option`` in their ``cli_options``."""
    return [a.name for a in _REGISTRY.values() if option in a.cli_options]


def cli_options() -> dict[str, CliOption]:
    """Every algorithm-specific option (hparams field -> :class:`CliOption`), in registration order."""
    out: dict[str, CliOption] = {}
    for alg in _REGISTRY.values():
        for name, help_text in alg.cli_options.items():
            if name not in out:
                tp = get_type_hints(alg.hparams_class)[name]
                choices = get_args(tp) if get_origin(tp) is Literal else None
                out[name] = CliOption(name, choices, help_text, tuple(option_owners(name)))
    return out


def step_fields() -> dict[str, str]:
    """``{name: step field}`` of the algorithms that have one, in registration order."""
    return {a.name: a.step_field for a in _REGISTRY.values() if a.step_field is not None}


def run_tag(alg: str, hparams: Mapping[str, Any] | None) -> str:
    """``" L5 eta 0.1 ..."``: the registered algorithm's :attr:`Algorithm.describe` of a run's hparams dict (a run of
    an algorithm not registered here, e.g. read from another toolkit's folder, gets the layers, ``eta``/``lr`` and the
    statistics); ``""`` without hparams."""
    if not hparams:
        return ""
    known = _REGISTRY.get(alg) if isinstance(alg, str) else None
    if known is not None:
        bits = known.describe(hparams)
    else:
        bits = tag_layers(hparams) + tag_value(hparams, "eta") + tag_value(hparams, "lr") + tag_statistics(hparams)
    return (" " + " ".join(bits)) if bits else ""


def load_hparams(path: str | Path) -> HyperParams:
    """Load any algorithm's hparams file; the class is chosen by its ``alg_name``. Reads our
    YAML, EasyEdit's YAML and (with ``alg_name`` in it) ROME/MEMIT-style JSON."""
    p = Path(path)
    if p.suffix == ".json":
        try:
            data, source = json.loads(p.read_text()), str(p)
        except (OSError, json.JSONDecodeError) as exc:
            raise ShiftEditError(f"cannot read hparams {path}: {exc}") from None
    else:
        data, source = read_yaml(path)
    if not isinstance(data, dict) or "alg_name" not in data:
        raise ShiftEditError(f"{source}: no alg_name; say which algorithm these hparams are for "
                             "(or load them with the class, e.g. ROMEHyperParams.from_json)")
    return get_algorithm(data["alg_name"]).hparams_class._from_any(data, source)
