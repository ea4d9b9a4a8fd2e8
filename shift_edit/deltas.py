"""Weight deltas and the edit result: apply in place, undo bit-exactly, report, save.

A :class:`WeightDelta` is the change to one weight matrix, kept in the canonical
``[out, in]`` orientation either as low-rank factors (``left @ right``) or dense.
:func:`apply_deltas` adds deltas to the model's parameters in place (the
``nn.Parameter`` objects are never replaced, so tied weights and optimiser
references survive) after saving the original tensors, which
:meth:`EditResult.undo` copies back: undo is bit-exact, not a subtraction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import Layout, to_param_layout
from .errors import ShiftEditError
from .hparams import HyperParams
from .io import tensor_hash
from .requests import EditRequest


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


@dataclass
class EditResult:
    """What an edit did to a model, with exact undo.

    Attributes:
        model: the edited model (weights changed in place).
        algorithm: registry name of the algorithm.
        hparams: the hparams used.
        requests: the requests, normalised.
        deltas: the applied deltas (empty if every request was skipped).
        orig_weights: parameter name -> the tensor before this edit (CPU clone).
        base_hashes: parameter name -> sha256 of the weight before this edit.
        skipped: per request, whether it was skipped (target already predicted).
        info: per-request algorithm details (e.g. ||x_n||, eta used).
        tok: the tokenizer the edit was made with (set by :func:`~shift_edit.editing.edit`);
            needed by :meth:`outcome`.
    """

    model: nn.Module
    algorithm: str
    hparams: HyperParams
    requests: list[EditRequest]
    deltas: list[WeightDelta]
    orig_weights: dict[str, torch.Tensor]
    base_hashes: Mapping[str, str]
    skipped: list[bool]
    info: list[dict[str, Any]] = field(default_factory=list)
    undone: bool = False
    tok: Any = field(default=None, repr=False, compare=False)
    _outcome: Any = field(default=None, init=False, repr=False, compare=False)

    def outcome(self, tok: Any = None) -> list:
        """Per request: strict top-1 (every target token the argmax) and ``P(target)`` before
        and after, as :class:`~shift_edit.outcome.EditOutcome` (measured once, then cached).

        Raises:
            ShiftEditError: no tokenizer is known, or the edit was undone.
        """
        if self._outcome is None:
            from .errors import ShiftEditError
            from .outcome import edit_outcome

            tok = tok if tok is not None else self.tok
            if tok is None:
                raise ShiftEditError("EditResult.outcome needs the tokenizer: outcome(tok)")
            self._outcome = edit_outcome(self, tok)
        return self._outcome

    def undo(self) -> None:
        """Restore every weight this edit changed, bit for bit, in place."""
        if self.undone:
            return
        with torch.no_grad():
            for name, orig in self.orig_weights.items():
                self.model.get_parameter(name).copy_(orig)
        self.undone = True

    def summary(self, *, outcome: bool = True) -> list[dict[str, Any]]:
        """One row per changed matrix: layer, module, rank, delta norm, relative norm, and the
        requests that were skipped (already predicted; they contribute nothing). An edit whose
        requests were all skipped changed no matrix: see :attr:`skipped`.

        With ``outcome`` (default) and a known tokenizer, the returned list also carries
        ``.outcome``: one dict per request with ``top1_before``/``top1_after`` (strict: every
        target token the argmax) and ``prob_before``/``prob_after`` (P(target)); see
        :meth:`outcome`. Its ``str()`` is a readable report of both."""
        params = dict(self.model.named_parameters())
        rows = EditSummary()
        for d in self.deltas:
            norm = d.norm()
            base = float(self.orig_weights[d.param].float().norm())
            rows.append(
                {
                    "layer": d.layer,
                    "module": d.module,
                    "rank": d.rank,
                    "delta_norm": norm,
                    "relative_norm": norm / base if base else float("inf"),
                    "dtype": str(params[d.param].dtype).replace("torch.", ""),
                    "skipped_requests": [i for i, sk in enumerate(self.skipped) if sk],
                }
            )
        if outcome and (self.tok is not None or self._outcome is not None) and not self.undone:
            rows.outcome = [o.to_dict() for o in self.outcome()]
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (no tensors)."""
        return {
            "algorithm": self.algorithm,
            "hparams": self.hparams.to_dict(),
            "requests": [r.to_dict() for r in self.requests],
            "skipped": self.skipped,
            "changes": list(self.summary(outcome=False)),
            "info": self.info,
        }

    def save_patch(self, path: str | Path) -> Path:
        """Write the edit as a small patch file (see :mod:`shift_edit.patch`)."""
        from .patch import save_patch

        return save_patch(self, path)


class EditSummary(list):
    """:meth:`EditResult.summary`: the per-matrix rows (a list) plus ``outcome``, one dict per
    request (strict top-1 and P(target) before/after), or None when not measured."""

    outcome: list[dict[str, Any]] | None = None

    def __str__(self) -> str:
        from .outcome import fmt_prob

        lines = []
        for o in self.outcome or []:
            yn = {True: "yes", False: "no"}
            lines.append(f"target {o['target']!r}: strict top-1 {yn[o['top1_before']]} -> {yn[o['top1_after']]}, "
                         f"P(target) {fmt_prob(o['prob_before'])} -> {fmt_prob(o['prob_after'])}")
        for r in self:
            rank = "dense" if r["rank"] is None else f"rank {r['rank']}"
            lines.append(f"{r['module']} (layer {r['layer']}): {rank}, |delta| {r['delta_norm']:.4g}, "
                         f"relative {r['relative_norm']:.3g}")
        return "\n".join(lines)


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
    model: nn.Module, deltas: list[WeightDelta], *, max_relative_norm: float | None = None
) -> tuple[dict[str, torch.Tensor], Mapping[str, str]]:
    """Add ``deltas`` to the model's weights in place.

    Args:
        max_relative_norm: refuse a summed delta whose ``||ΔW||_F / ||W||_F`` exceeds this
            (see :mod:`shift_edit.guard`); ``None``: no bound.

    Returns:
        ``(orig_weights, base_hashes)`` for the changed parameters.

    Deltas on the same weight are summed first. Every new weight is computed (in float32,
    float64 for float64 models, then cast back) and checked before any parameter is touched.

    Raises:
        ShiftEditError: a delta is not finite, too large (``EditRefusedError``) or does not
            fit its weight; nothing is changed.
    """
    from .guard import check_relative_norm

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
    orig = {name: p.detach().cpu().clone() for name, p, _ in prepared}
    hashes = LazyHashes(orig)
    with torch.no_grad():
        for _name, p, new in prepared:
            p.copy_(new)
    return orig, hashes
