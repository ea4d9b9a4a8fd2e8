"""Weight deltas: apply in place, restore bit-exactly.

A :class:`WeightDelta` is the change to one weight matrix, kept in the canonical
``[out, in]`` orientation either as low-rank factors (``left @ right``) or dense.
:func:`apply_deltas` adds deltas to the model's parameters in place (the
``nn.Parameter`` objects are never replaced, so tied weights and optimiser
references survive) after saving the original tensors, which
:func:`restore_weights` copies back (:meth:`~shift_edit.core.result.EditResult.undo`): undo is
bit-exact, not a subtraction. The edit result itself lives in :mod:`shift_edit.core.result`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..files.io import tensor_hash
from ..model.architectures import Layout, to_param_layout
from .errors import EditRefusedError, ShiftEditError

#: Default bound on ||ΔW||_F / ||W||_F per matrix; see eval/robustness/README.md for the
#: relative norms the shipped hparams produce (at most about 0.06, MEMIT batches of 10 included).
DEFAULT_MAX_RELATIVE_NORM = 1.0


def check_relative_norm(param: str, update: torch.Tensor, weight: torch.Tensor, bound: float | None) -> float:
    """``||update|| / ||weight||`` (float64 norms); raise :class:`EditRefusedError` above ``bound``."""
    delta = float(torch.linalg.vector_norm(update.detach(), dtype=torch.float64))
    base = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64))
    rel = delta / base if base > 0 else (0.0 if delta == 0 else math.inf)
    if bound is not None and not rel <= bound:  # `not <=` also catches NaN
        raise EditRefusedError(
            f"refusing the edit: it changes {param} by {rel:.3g} of its norm (||dW||/||W||), above "
            f"max_relative_norm {bound:g}; lower the step size, or pass --force (force=True) if you mean it"
        )
    return rel


@dataclass
class WeightDelta:
    """The change to one weight, canonical orientation ``[out, in]``.

    Exactly one of (``left``, ``right``) or ``dense`` is set:
    ``left`` is ``[out, r]``, ``right`` is ``[r, in]``, ``dense`` is ``[out, in]``.
    Factors are stored in float32 on the CPU.
    """

    module: str
    layout: Layout
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        low_rank = self.left is not None and self.right is not None
        if low_rank == (self.dense is not None):
            raise ValueError("a WeightDelta is either low-rank (left, right) or dense")

    @property
    def param(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int | None:
        return None if self.left is None else int(self.left.shape[1])

    def canonical(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` matrix (the factors' product taken in ``dtype`` if given)."""
        if self.dense is not None:
            return self.dense if dtype is None else self.dense.to(dtype)
        if dtype is None:
            return self.left @ self.right
        return self.left.to(dtype) @ self.right.to(dtype)

    def in_param_layout(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The delta shaped like the stored weight."""
        return to_param_layout(self.canonical(dtype), self.layout)

    def norm(self) -> float:
        """Frobenius norm of the delta."""
        return float(self.canonical().norm())

    @staticmethod
    def merge(deltas: list[WeightDelta]) -> list[WeightDelta]:
        """Sum deltas on the same module: low-rank factors are concatenated, else dense."""
        by_module: dict[str, list[WeightDelta]] = {}
        for d in deltas:
            by_module.setdefault(d.module, []).append(d)
        out = []
        for module, group in by_module.items():
            first = group[0]
            if len(group) == 1:
                out.append(first)
            elif all(d.dense is None for d in group):
                out.append(
                    WeightDelta(
                        module, first.layout,
                        left=torch.cat([d.left for d in group], dim=1),
                        right=torch.cat([d.right for d in group], dim=0),
                        layer=first.layer,
                    )
                )
            else:
                dense = sum(d.canonical() for d in group)
                out.append(WeightDelta(module, first.layout, dense=dense, layer=first.layer))
        return out


class LazyHashes(Mapping[str, str]):
    """``{parameter name: sha256}`` of the original weights, each hashed on first read.

    Editing keeps the original tensors anyway (for undo); only a patch or adapter needs
    their hashes, so an edit that is never saved does not pay for hashing them.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors
        self._done: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        if name not in self._done:
            self._done[name] = tensor_hash(self._tensors[name])
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"LazyHashes({dict(self)!r})"


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: min and max propagate NaN, and are finite only if all are
    (ten times cheaper than ``isfinite(t).all()``, which builds a mask as large as the weight)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def apply_deltas(
    model: nn.Module,
    deltas: list[WeightDelta],
    *,
    max_relative_norm: float | None = None,
    orig: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], Mapping[str, str]]:
    """Add ``deltas`` to the model's weights in place.

    Args:
        max_relative_norm: refuse a summed delta whose ``||ΔW||_F / ||W||_F`` exceeds this
            (see :mod:`shift_edit.core.guard`); ``None``: no bound.
        orig: a dict to fill with the original tensors before any weight changes (and to
            return), so a caller that is interrupted as this returns still has them to restore.

    Returns:
        ``(orig_weights, base_hashes)`` for the changed parameters.

    Deltas on the same weight are summed first. Every new weight is computed (in float32,
    float64 for float64 models, then cast back) and checked before any parameter is touched.

    Raises:
        ShiftEditError: a delta is not finite, too large (``EditRefusedError``) or does not
            fit its weight; nothing is changed.
    """
    prepared = []
    for d in WeightDelta.merge(deltas):
        try:
            p = model.get_parameter(d.param)  # a direct lookup: no walk over every parameter
        except AttributeError:
            raise ShiftEditError(f"no parameter {d.param!r} in this model") from None
        acc = torch.promote_types(p.dtype, torch.float32)  # float32, or float64 for float64 models
        update = d.in_param_layout(acc)
        if update.shape != p.shape:
            raise ShiftEditError(
                f"delta for {d.param} has shape {tuple(update.shape)}, the weight {tuple(p.shape)}"
            )
        if not _all_finite(update):
            raise ShiftEditError(f"refusing an edit that makes {d.param} non-finite")
        check_relative_norm(d.param, update, p, max_relative_norm)
        new = (p.detach().to(acc) + update.to(device=p.device, dtype=acc)).to(p.dtype)
        if not _all_finite(new):
            raise ShiftEditError(f"refusing an edit that makes {d.param} non-finite")
        prepared.append((d.param, p, new))
    orig = {} if orig is None else orig
    orig.update({name: p.detach().cpu().clone() for name, p, _ in prepared})
    hashes = LazyHashes(orig)
    with torch.no_grad():
        try:
            for _name, p, new in prepared:
                p.copy_(new)
        except BaseException:  # interrupted between two weights: none stays changed
            put_back((p, orig[name]) for name, p, _ in prepared)
            raise
    return orig, hashes


def restore_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (``{param name: tensor}``, e.g. ROME's ``orig_weights``) into ``model``,
    in place: the Parameter objects stay the same, so tied weights and optimisers keep working.
    Every name and shape is checked before any weight is touched, and an interrupted copy puts
    back the weights it already copied (all or none).

    Raises:
        ShiftEditError: a name the model does not have, or a tensor of another shape.
    """
    params, missing = {}, []
    for name in weights:
        try:
            params[name] = model.get_parameter(name)  # a direct lookup (tied names too), no walk
        except AttributeError:
            missing.append(name)
    if missing:
        raise ShiftEditError(f"orig_weights names parameters this model does not have: {sorted(missing)[:3]}")
    for name, orig in weights.items():  # check all before copying any
        if not isinstance(orig, torch.Tensor) or tuple(orig.shape) != tuple(params[name].shape):
            got = tuple(orig.shape) if isinstance(orig, torch.Tensor) else type(orig).__name__
            raise ShiftEditError(
                f"orig_weights[{name!r}] has shape {got}, the model's parameter {tuple(params[name].shape)}: "
                "these are not this model's original weights"
            )
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        try:
            for name, orig in weights.items():
                p = params[name]
                before = p.detach().clone() if len(weights) > 1 else None
                done.append((p, before))  # before the copy: putting back an uncopied weight is harmless
                p.copy_(orig)
        except BaseException:  # interrupted between two weights: put back the ones already copied
            for p, before in done:
                if before is not None:
                    p.copy_(before)
            raise


def put_back(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each ``(weight, original)`` back in place, for an algorithm's ``finally`` after it changed
    weights temporarily: an exception (``KeyboardInterrupt``) arriving meanwhile is raised only once
    every weight is back, so an interrupt never leaves a temporary change applied. A second one in
    the same call is raised at once."""
    pending = list(pairs)
    first: BaseException | None = None
    while pending:
        weight, orig = pending[0]
        try:
            with torch.no_grad():
                weight.copy_(orig)
            pending.pop(0)
        except BaseException as exc:
            if first is not None:
                raise
            first = exc  # copy_ is idempotent: the same weight is copied again
    if first is not None:
        raise first


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``weights`` copied into the model for the block; the tensors there before are copied back
    afterwards (bit-exactly, also on an error)."""
    with torch.no_grad():
        saved = {name: model.get_parameter(name).detach().clone() for name in weights}
    try:
        restore_weights(model, weights)
        yield
    finally:
        put_back((model.get_parameter(name), w) for name, w in saved.items())
