"""What a lifelong (sequential) run remembers between edits: the keys of earlier edits.

Algorithms that protect earlier edits (AlphaEdit's null-space update, SHIFT_PLUS, SHIFT_NEURON) need
the keys — the inputs of each edited matrix at the edited positions — of every edit already made
(SHIFT_NEURON also records which neurons it rewrote, as one-hot FF2 keys).
:func:`shift_edit.edit` hands an :class:`EditMemory` to algorithms registered with
``uses_memory=True`` and, only after the deltas were applied, appends the keys the algorithm
returned in :attr:`Computed.memory_keys`. A refused or failed edit leaves the memory as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..files.io import atomic_write_bytes, content_sha256
from .errors import ShiftEditError

_CHECKSUM_KEY = "shift_edit_sha256"  # as patches carry theirs


class EditMemory:
    """Keys of the edits made so far, per edited parameter.

    ``keys(param)`` is a float32 CPU tensor ``[n_keys, d_in]`` (rows in edit order) or ``None``.
    """

    def __init__(self) -> None:
        self._keys: dict[str, torch.Tensor] = {}

    def keys(self, param: str) -> torch.Tensor | None:
        """The remembered keys for ``param`` (``"<module>.weight"``), or ``None``."""
        return self._keys.get(param)

    def add(self, new: Mapping[str, torch.Tensor]) -> None:
        """Append rows ``[n, d_in]`` per parameter name; all or none (a width mismatch changes nothing)."""
        keys = dict(self._keys)
        for param, k in new.items():
            k = k.detach().float().cpu()
            if k.dim() == 1:
                k = k[None]
            old = keys.get(param)
            if old is not None and old.shape[1] != k.shape[1]:
                raise ShiftEditError(f"memory keys for {param} have width {old.shape[1]}, new ones {k.shape[1]}")
            keys[param] = k.contiguous() if old is None else torch.cat([old, k]).contiguous()
        self._keys = keys

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The memory as it is now, for :meth:`restore` (cheap: :meth:`add` never changes a stored tensor)."""
        return dict(self._keys)

    def restore(self, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Put back the memory a :meth:`snapshot` saw."""
        self._keys = dict(snapshot)

    def params(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        """Number of remembered keys, over all parameters."""
        return sum(int(k.shape[0]) for k in self._keys.values())

    def save(self, path: str | Path) -> None:
        """Write the memory as safetensors with the sha256 of its content in the header (atomically)."""
        tensors = {p: k.contiguous() for p, k in self._keys.items()}
        atomic_write_bytes(Path(path), save(tensors, metadata={_CHECKSUM_KEY: content_sha256(tensors, [])}))

    @classmethod
    def load(cls, path: str | Path) -> EditMemory:
        """Read a memory written by :meth:`save`, after checking its checksum.

        Raises:
            ShiftEditError: an unreadable file, or one whose content does not match its checksum (or has none).
        """
        try:
            with safe_open(str(path), framework="pt") as fh:
                stored = (fh.metadata() or {}).get(_CHECKSUM_KEY)
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - OSError and safetensors' own error types
            raise ShiftEditError(f"{path}: not a readable edit memory ({type(exc).__name__}: {exc})") from None
        if stored is None or content_sha256(tensors, []) != stored:
            raise ShiftEditError(f"{path}: the edit memory "
                                 f"{'has no checksum' if stored is None else 'fails its checksum'}"
                                 ": its content cannot be trusted")
        mem = cls()
        mem._keys = {p: k.float() for p, k in tensors.items()}
        return mem
