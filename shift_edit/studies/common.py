"""Helpers the studies share: unit-step deltas, scaled temporary edits, per-record files, perplexity summaries."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.deltas import WeightDelta, apply_deltas
from ..core.hparams import HyperParams
from ..core.registry import get_algorithm, linear_step_fields
from ..core.requests import EditRequest
from ..files.io import atomic_write_json, atomic_write_text


def __getattr__(name: str) -> Any:
    """``STEP_FIELD``: ``{alg: step field}`` of the algorithms the studies can scale (registered with
    ``linear_step=True``), read from the registry when asked for (PEP 562)."""
    if name == "STEP_FIELD":
        return linear_step_fields()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unit_hparams(alg: str, layer: int, **extra: Any) -> HyperParams:
    """Hparams of ``alg`` at one layer with step size 1 and no skipping."""
    cls = get_algorithm(alg).hparams_class
    return cls(layers=[layer], skip_if_predicted=False, **{linear_step_fields()[alg]: 1.0}, **extra)


def unit_deltas(model: nn.Module, tok, request: EditRequest, hparams: HyperParams) -> list[WeightDelta]:
    """The deltas at step size 1. The algorithms registered with ``linear_step`` (SHIFT, SGD and
    ADAM's first step) are linear in the step size, so the delta at ``lr`` is ``lr`` times these
    (checked in the tests)."""
    return get_algorithm(type(hparams).ALG_NAME).compute(model, tok, [request], hparams).deltas


def scaled(deltas: list[WeightDelta], s: float) -> list[WeightDelta]:
    """``s`` times each delta."""
    out = []
    for d in deltas:
        if d.dense is not None:
            out.append(WeightDelta(d.module, d.layout, dense=d.dense * s, layer=d.layer))
        else:
            out.append(WeightDelta(d.module, d.layout, left=d.left * s, right=d.right, layer=d.layer))
    return out


@contextlib.contextmanager
def temporarily_applied(model: nn.Module, deltas: list[WeightDelta]) -> Iterator[None]:
    """Apply ``deltas`` in place for the ``with`` block, then restore the weights bit-exactly."""
    orig, _ = apply_deltas(model, deltas)
    try:
        yield
    finally:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in orig.items():
                params[name].copy_(t)


def read_done(path: Path, protocol_key: dict[str, Any]) -> dict[str, Any] | None:
    """A per-record result written earlier under the same protocol, else ``None``."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("protocol_key") == protocol_key else None


def write_record(path: Path, protocol_key: dict[str, Any], payload: dict[str, Any]) -> None:
    atomic_write_json(path, {"protocol_key": protocol_key, **payload})


def ppl_stats(ppls: Sequence[float]) -> dict[str, Any]:
    """``ppl_n``, ``ppl_mean`` and ``ppl_median`` of one summary cell (``None`` when nothing was measured)."""
    return {"ppl_n": len(ppls), "ppl_mean": statistics.fmean(ppls) if ppls else None,
            "ppl_median": statistics.median(ppls) if ppls else None}


def save_figure(fig, title: str, path: str | Path) -> None:
    """Title ``fig``, write it to ``path`` (80 dpi) and close it (the studies' figures)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV; the columns are the union of the rows' keys, in first-seen order."""
    fields: dict[str, None] = {}
    for r in rows:
        fields.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), restval="")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_tables(out: Path, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]]) -> None:
    """A study's ``rows.csv`` and ``summary.csv`` in ``out``."""
    atomic_write_text(out / "rows.csv", to_csv(rows))
    atomic_write_text(out / "summary.csv", to_csv(summary))
