"""Typed hyperparameters, validated on construction, loaded from and written to YAML.

Every algorithm's hparams are a dataclass deriving from :class:`HyperParams`.
Field types are checked against the annotations when the object is built, so a
wrong YAML file fails with a message naming the field, the bad value and what is
allowed. Files round-trip: :meth:`HyperParams.to_yaml` writes sorted keys and the
package version; unknown keys on load are an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from .._version import __version__
from ..files.io import atomic_write_text
from .errors import ShiftEditError
from .foreign_hparams import is_foreign, translate
from .shipped_hparams import hparams_root

H = TypeVar("H", bound="HyperParams")

_VERSION_KEY = "shift_edit_version"


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    return False


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against the annotation ``tp``; return (ok, value converted)."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            ok, conv = _coerce(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp, *_rest) = get_args(tp)
        out = []
        for item in value:
            ok, conv = _coerce(item, item_tp)
            if not ok:
                return False, value
            out.append(conv)
        return True, list(out) if origin is list else tuple(out)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # "5e-1": YAML 1.1 reads it as a string; EasyEdit converts such strings too
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


@dataclasses.dataclass
class HyperParams:
    """Base class of every algorithm's hparams.

    Subclasses are dataclasses; ``ALG_NAME`` is the registry name they belong to.
    Validation of types runs in ``__post_init__``; subclasses add range checks in
    :meth:`validate` and call ``super().validate()``.
    """

    ALG_NAME: ClassVar[str] = ""
    #: the field holding the edit's step size (scaled by ``--eta`` and searched by ``--until-top1``),
    #: or None when the algorithm has no single step size
    STEP_FIELD: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, conv = _coerce(value, hints[f.name])
            if not ok:
                raise ShiftEditError(
                    f"{type(self).__name__}.{f.name}: got {value!r} ({type(value).__name__}); "
                    f"expected {_type_name(hints[f.name])}"
                )
            object.__setattr__(self, f.name, conv)
            if _has_nan(conv):  # NaN passes every `x <= 0` range check: refused for every field here
                raise ShiftEditError(
                    f"{type(self).__name__}.{f.name}: got {value!r}; NaN is not a value, give a number"
                )
        self.validate()

    @property
    def alg_name(self) -> str:
        """The registry name (EasyEdit scripts read ``hparams.alg_name``)."""
        return self.ALG_NAME

    @staticmethod
    def class_for(alg: str) -> type[HyperParams]:
        """The hparams class of the algorithm named ``alg`` (found among this class's subclasses,
        so that reading hparams needs no import of the registry, which imports this module)."""
        seen, stack = [], list(HyperParams.__subclasses__())
        while stack:
            c = stack.pop(0)
            if c.ALG_NAME == alg:
                return c
            seen.append(c.ALG_NAME)
            stack.extend(c.__subclasses__())
        known = ", ".join(sorted(n for n in seen if n))
        raise ShiftEditError(f"unknown algorithm {alg!r}; known: {known}")

    def validate(self) -> None:
        """Range and consistency checks; raise :class:`ShiftEditError` naming the field."""

    def _fail(self, field: str, value: Any, allowed: str) -> None:
        raise ShiftEditError(f"{type(self).__name__}.{field}: got {value!r}; {allowed}")

    def _require_finite(self, *names: str, positive: bool = False) -> None:
        """Each named field is a finite number ``>= 0`` (``> 0`` with ``positive``)."""
        for name in names:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                self._fail(name, v, f"it must be a finite number {'>' if positive else '>='} 0")

    # --- dict / YAML ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[H], data: dict[str, Any], *, source: str = "hparams") -> H:
        """Build from a mapping; unknown or missing keys are errors that name them."""
        if not isinstance(data, dict):
            raise ShiftEditError(f"{source}: expected a mapping of hparams, got {type(data).__name__}")
        data = dict(data)
        data.pop(_VERSION_KEY, None)
        alg = data.pop("alg_name", cls.ALG_NAME)
        if cls.ALG_NAME and alg != cls.ALG_NAME:
            raise ShiftEditError(
                f"{source}: alg_name is {alg!r} but these hparams are for {cls.ALG_NAME!r}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ShiftEditError(
                f"{source}: unknown hparams {unknown} for {cls.ALG_NAME or cls.__name__}; "
                f"allowed: {sorted(fields)}"
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ShiftEditError(f"{source}: missing required hparams {missing}")
        return cls(**data)

    @classmethod
    def from_hparams(cls: type[H], path: str | Path) -> H:
        """Load a YAML file, EasyEdit style: ``"hparams/SHIFT/smollm2-135m"`` or with ``.yaml``.

        EasyEdit's own YAML files (``hparams/ROME/gpt2-xl.yaml`` of zjunlp/EasyEdit) are read
        through the mapping of :mod:`shift_edit.core.foreign_hparams`."""
        data, source = read_yaml(path)
        return cls._from_any(data, source)

    @classmethod
    def from_json(cls: type[H], path: str | Path) -> H:
        """Load a JSON file: ROME's/MEMIT's ``hparams/<ALG>/<model>.json`` (mapped through
        :mod:`shift_edit.core.foreign_hparams`) or our own fields written as JSON."""
        p = Path(path)
        if not p.is_file():
            raise ShiftEditError(f"hparams file not found: {path}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ShiftEditError(f"{p}: not valid JSON ({exc})") from None
        return cls._from_any(data, str(p))

    @classmethod
    def _from_any(cls: type[H], data: Any, source: str) -> H:
        if isinstance(data, dict) and is_foreign(data):
            target, fields = translate(cls, data, source=source, class_for=HyperParams.class_for)
            return target.from_dict(fields, source=source)
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data with ``alg_name`` first-class, for result files and YAML."""
        out = {"alg_name": self.ALG_NAME}
        out.update(dataclasses.asdict(self))
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise with sorted keys and the package version; write to ``path`` if given."""
        data = self.to_dict()
        data[_VERSION_KEY] = __version__
        text = yaml.safe_dump(data, sort_keys=True)
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    def replace(self: H, **changes: Any) -> H:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def read_yaml(path: str | Path) -> tuple[Any, str]:
    """Parse an hparams YAML file (``.yaml`` may be left off); returns ``(data, path read)``."""
    p = Path(path)
    if not p.exists() and p.suffix not in (".yaml", ".yml"):
        p = p.with_name(p.name + ".yaml")
    if not p.is_file() and len(p.parts) >= 3 and p.parts[-3] == "hparams":
        # "hparams/SHIFT/smollm2-135m" names a shipped file: found inside the package from any folder
        shipped = hparams_root().joinpath(p.parts[-2], p.name)
        if shipped.is_file():
            p = Path(str(shipped))
    if not p.is_file():
        raise ShiftEditError(f"hparams file not found: {path}")
    try:
        return yaml.safe_load(p.read_text()), str(p)
    except yaml.YAMLError as exc:
        raise ShiftEditError(f"{p}: not valid YAML ({_yaml_reason(exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ShiftEditError(f"{p}: cannot read the hparams file ({exc})") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """One line: what the parser found and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{what}{where}".split())
