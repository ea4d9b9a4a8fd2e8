"""The resumable state of a sequential run: what it remembers between edits (:class:`SequentialState`), saved
with the edited parameters' values and the edit memory in one checksummed file per save, and read back verified
(a damaged state is one line saying so; it cannot be rebuilt)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.deltas import restore_weights
from ..core.errors import ShiftEditError
from ..core.memory import EditMemory
from ..files.io import CacheCheckError, check_verified, write_verified


class SequentialState:
    """What a run remembers between edits: edits done, the edited parameters' current values,
    the memory, the records' unedited values, per-batch timings."""

    def __init__(self) -> None:
        self.n_batches = 0
        self.n_edits = 0
        self.touched: list[str] = []
        self.batches: list[dict[str, Any]] = []
        self.unedited: list[dict[str, float]] = []
        self.unedited_ppl: float | None = None
        self.checkpoints: list[dict[str, Any]] = []

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_json(cls, d: Any) -> SequentialState:
        """Read :meth:`to_json`'s dict back; ``ValueError`` if it is not one (a damaged state file)."""
        s = cls()
        if not isinstance(d, dict) or not {"n_batches", "n_edits"} <= set(d) or set(d) - set(vars(s)):
            raise ValueError("the state is not the dict this version writes")  # (older states may lack later fields)
        for k, v in d.items():
            want = type(getattr(s, k))
            if not (isinstance(v, want) and not isinstance(v, bool) or (k == "unedited_ppl" and v is None)
                    or (k == "unedited_ppl" and isinstance(v, (int, float)))):
                raise ValueError(f"state field {k!r} is {v!r:.40}")
            setattr(s, k, v)
        if s.n_batches < 0 or s.n_edits < 0 or len(s.batches) != s.n_batches:
            raise ValueError(f"{s.n_edits} edits in {s.n_batches} batches, {len(s.batches)} batch records")
        return s


STATE_FORMAT = 2  # 2: one checksummed tensor file per save (io.write_verified); 1: unchecksummed safetensors


def save_state(state_dir: Path, st: SequentialState, model: nn.Module, memory: EditMemory, base_fp: str) -> None:
    """The edited parameters' values and the memory in one file named by the batch count, then
    ``state.json`` (the commit point) naming it with both files' checksums
    (:func:`~shift_edit.files.io.write_verified`), then the older files are removed."""
    tag = f"{st.n_batches:06d}"
    tensors = {f"weights/{name}": model.get_parameter(name).detach().cpu().contiguous() for name in st.touched}
    tensors.update({f"memory/{param}": memory.keys(param) for param in memory.params()})
    write_verified(state_dir / f"state_{tag}.pt", state_dir / "state.json", tensors,
                   {"format_version": STATE_FORMAT, "base_fingerprint": base_fp, "tag": tag, "state": st.to_json()})
    for old in [*state_dir.glob("*.pt"), *state_dir.glob("*.safetensors")]:
        if not old.stem.endswith(tag):
            old.unlink(missing_ok=True)


def load_state(state_dir: Path, model: nn.Module, base_fp: str
                ) -> tuple[SequentialState, EditMemory, dict[str, torch.Tensor]] | None:
    """The saved state, verified and loaded into ``model`` in place; also returns the touched parameters'
    unedited values.

    Raises:
        ShiftEditError: a state of other weights, or one that fails its checksums (it cannot be rebuilt:
            one line naming the folder to delete to start the run again).
    """
    p = state_dir / "state.json"
    if not p.is_file():
        return None
    try:
        saved = json.loads(p.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        fingerprint, tag = saved["base_fingerprint"], saved["tag"]
        if not isinstance(fingerprint, str) or not isinstance(tag, str) or not tag.isalnum():
            raise ValueError(f"bad base_fingerprint or tag {tag!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_state(p, f"unreadable ({type(exc).__name__}: {exc})") from None
    if fingerprint != base_fp:
        raise ShiftEditError(f"{state_dir}: saved state belongs to other weights ({fingerprint}, this model {base_fp})")
    if saved.get("format_version") != STATE_FORMAT:
        raise damaged_state(p, f"it has no checksums (format {saved.get('format_version', 1)}, written by an older "
                          "shift_edit), so it cannot be verified")
    try:
        meta, tensors = check_verified(state_dir / f"state_{tag}.pt", p,
                                       {"format_version": STATE_FORMAT, "base_fingerprint": base_fp, "tag": tag})
        st = SequentialState.from_json(meta["state"])
        weights = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("weights/")}
        keys = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("memory/")}
        if set(weights) != set(st.touched):
            raise CacheCheckError(f"holds the weights of {sorted(weights)}, its state names {sorted(st.touched)}")
        originals = {name: model.get_parameter(name).detach().cpu().clone() for name in weights}
        restore_weights(model, weights)  # checks every name and shape before copying any
    except (CacheCheckError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise damaged_state(p, f"it {exc}" if isinstance(exc,
                                                         CacheCheckError) else f"{type(exc).__name__}: {exc}") from None
    memory = EditMemory()
    memory.add(keys)
    return st, memory, originals


def damaged_state(path: Path, why: str) -> ShiftEditError:
    """The one line for a sequential run whose saved state cannot be read or verified (it cannot be rebuilt)."""
    run_dir = path.parent.parent
    why = why.splitlines()[0][:300] if why else "unreadable"
    return ShiftEditError(f"{path}: the saved state of this sequential run is damaged: {why}; nothing was changed. "
                          f"It cannot be rebuilt: to start over, delete {run_dir} (or pass another --out)")
