"""The patch file format: writing, reading and checking a small safetensors file of an edit's factors.

Layout of a patch file (``*.safetensors``):

- tensors ``"<module>.left"`` ``[out, r]`` and ``"<module>.right"`` ``[r, in]`` for
  low-rank deltas (canonical ``[out, in]`` orientation), or ``"<module>.dense"``;
- header metadata ``"shift_edit"``: JSON with the format version, algorithm,
  hparams, requests, the model's name and type, the fingerprint of the whole base model
  (:func:`shift_edit.files.io.model_fingerprint`, taken with the edit's original weights) and per
  module its layout, layer, parameter name and the sha256 of the weight the patch was made
  against;
- header metadata ``"shift_edit_sha256"``: the checksum of the file's own content
  (:func:`shift_edit.files.io.content_sha256` over the ``"shift_edit"`` JSON text and every tensor),
  verified before anything is applied: a corrupted or altered file is refused, naming it.
  Patches of format version 1 (no checksum) are read only when asked (``allow_unchecksummed=True``,
  ``--allow-unchecksummed``), with a warning, and only if they carry no field of a later format
  (:data:`LATER_FIELDS`, or a checksum): relabelling a format-2 file as format 1 to drop its
  checksum is refused. The edit guard (:mod:`shift_edit.core.guard`) still applies to them.

Base check (``base_check``): ``"model"`` (default, strict) refuses a model whose whole
fingerprint differs from the base's, e.g. one with another edit in any layer;
``"matrices"`` only compares the matrices the patch changes, so patches of different
layers can be stacked. Version-1 patches carry no model fingerprint: only ``"matrices"``.
:mod:`shift_edit.files.patch` applies and reverts patches (and adapter folders).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from .._version import __version__
from ..core.deltas import WeightDelta
from ..core.errors import PatchMismatchError, ShiftEditError
from .io import atomic_write_bytes, content_sha256, model_fingerprint, tensor_hash

FORMAT = "shift_edit.patch"
FORMAT_VERSION = 2  # 2: content checksum and whole-model base fingerprint
CHECKSUM_KEY = "shift_edit_sha256"
_KINDS = ("left", "right", "dense")

#: metadata fields first written by format 2 (patches and adapters): a file that says version 1 and holds
#: one (or a checksum) was relabelled
LATER_FIELDS = ("base_fingerprint",)
#: the flag that reads an unchecksummed format-1 file, in the message that refuses one
UNCHECKSUMMED_FLAG = "allow_unchecksummed=True (--allow-unchecksummed)"

BaseCheck = Literal["model", "matrices"]
BASE_CHECKS = ("model", "matrices")

log = logging.getLogger(__name__)


class SavedEdit(Protocol):
    """What a patch is written from: an :class:`~shift_edit.core.result.EditResult` (named by its fields, so this
    module need not import the result module, which imports this one)."""

    algorithm: str
    hparams: Any
    requests: Sequence[Any]
    skipped: Any
    model: nn.Module
    orig_weights: Mapping[str, torch.Tensor]
    base_hashes: Mapping[str, str]
    deltas: Sequence[WeightDelta]
    undone: bool


class PatchChecksumError(ShiftEditError):
    """A patch or adapter whose content does not match the checksum it carries."""


def _model_name(model: nn.Module) -> str:
    return getattr(model, "_shift_edit_name", None) or getattr(model.config, "_name_or_path", "") or ""


def patch_metadata(result: SavedEdit) -> dict[str, Any]:
    """The JSON metadata stored with a patch."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shift_edit_version": __version__,
        "algorithm": result.algorithm,
        "hparams": result.hparams.to_dict(),
        "requests": [r.to_dict() for r in result.requests],
        "skipped": result.skipped,
        "model": {"name_or_path": _model_name(result.model),
                  "model_type": getattr(result.model.config, "model_type", "")},
        "base_fingerprint": model_fingerprint(result.model, overrides=result.orig_weights),
        "modules": {
            d.module: {
                "param": d.param,
                "layout": d.layout,
                "layer": d.layer,
                "rank": d.rank,
                "base_sha256": result.base_hashes[d.param],
            }
            for d in result.deltas
        },
    }


def save_patch(result: SavedEdit, path: str | Path) -> Path:
    """Write ``result`` as a patch file (atomically). Returns the path written."""
    path = Path(path)
    if result.undone:
        raise ShiftEditError("this edit was undone; there is nothing to save")
    tensors = {}
    for d in result.deltas:
        if d.dense is None:
            tensors[f"{d.module}.left"] = d.left.float().contiguous().clone()  # factors may share storage
            tensors[f"{d.module}.right"] = d.right.float().contiguous().clone()
        else:
            tensors[f"{d.module}.dense"] = d.dense.float().contiguous().clone()
    text = json.dumps(patch_metadata(result), sort_keys=True)
    meta = {"shift_edit": text, CHECKSUM_KEY: content_sha256(tensors, [text])}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    return path


def read_patch(path: str | Path, *, allow_unchecksummed: bool = False) -> tuple[dict[str, Any], list[WeightDelta]]:
    """Read a patch file: ``(metadata, deltas)``; a clear error if it is not one.

    Args:
        allow_unchecksummed: read a format-1 patch (written before checksums), whose content cannot be
            verified (see :func:`check_old_format`).

    Raises:
        PatchChecksumError: a checksum mismatch, a missing checksum, or a format-1 file without the flag
            or with a field of a later format.
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftEditError(f"patch file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types on a damaged header  # noqa: BLE001
        raise ShiftEditError(f"{path} is not a readable safetensors patch ({type(exc).__name__}: {exc})") from None
    raw = header.get("shift_edit")
    if raw is None:
        raise ShiftEditError(f"{path} is a safetensors file but not a shift_edit patch (no metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ShiftEditError(f"{path}: the patch metadata is not valid JSON ({exc})") from None
    version = meta.get("format_version", 0) if isinstance(meta, dict) else None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(version, int)
        or not 1 <= version <= FORMAT_VERSION
    ):
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ShiftEditError(f"{path}: unsupported patch format {got} (version {version})")
    check_old_format(str(path), version, meta, header, allow_unchecksummed)
    verify_checksum(str(path), header.get(CHECKSUM_KEY), tensors, [raw], version >= 2)
    return meta, deltas_from_tensors(meta, tensors, str(path), "patch")


def check_old_format(source: str, version: int, meta: dict[str, Any], header: dict[str, str],
                     allow_unchecksummed: bool) -> None:
    """Refuse a format-1 file (no checksum) that carries a field of a later format (a relabelled file), or
    any format-1 file unless ``allow_unchecksummed``; later formats pass."""
    if version >= 2:
        return
    later = [k for k in LATER_FIELDS if k in meta] + ([CHECKSUM_KEY] if CHECKSUM_KEY in header else [])
    if later:
        raise PatchChecksumError(f"{source} says format version 1 but carries {', '.join(later)} of a later format "
                                 "(relabelled to drop its checksum?): refused, nothing was applied")
    if not allow_unchecksummed:
        raise PatchChecksumError(f"{source} is format version 1 (written before checksums): its content cannot be "
                                 f"verified; nothing was applied; pass {UNCHECKSUMMED_FLAG} to read it anyway")


def verify_checksum(source: str, stored: str | None, tensors: dict[str, torch.Tensor], texts: list[str],
                    required: bool) -> None:
    """Compare the content checksum with the stored one; refuse a mismatch (or a missing one when required)."""
    if stored is None:
        if required:
            raise PatchChecksumError(f"{source}: the checksum is missing, so its content cannot be verified; nothing "
                                     f"was applied")
        log.warning("%s has no checksum (written by shift_edit before checksums); its content cannot be verified",
                    source)
        return
    if content_sha256(tensors, texts) != stored:
        raise PatchChecksumError(
            f"{source}: checksum mismatch: the file is corrupted or was modified after it was written; nothing was "
            f"applied"
        )


def deltas_from_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: str, what: str,
                        factors: dict[str, dict[str, torch.Tensor]] | None = None) -> list[WeightDelta]:
    """Build checked deltas from metadata and tensors (``factors``: module -> {kind: tensor} if given)."""
    deltas = []
    try:
        modules = meta["modules"]
        if not isinstance(modules, dict) or not modules:
            raise ValueError("no modules")
        for module, m in modules.items():
            parts = factors[module] if factors is not None else {k: tensors.get(f"{module}.{k}") for k in _KINDS}
            if m["layout"] not in ("out_in", "in_out"):
                raise ValueError(f"layout {m['layout']!r}")
            for kind, t in parts.items():
                if t is not None and (t.dim() != 2 or not t.is_floating_point()):
                    raise ValueError(f"{module}.{kind} is {t.dim()}-d {t.dtype}, expected a 2-d float matrix")
            left, right, dense = parts.get("left"), parts.get("right"), parts.get("dense")
            if left is not None and right is not None and left.shape[1] != right.shape[0]:
                raise ValueError(f"{module}: factors {tuple(left.shape)} and {tuple(right.shape)} do not multiply")
            layer = m.get("layer")
            if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
                raise ValueError(f"layer {layer!r}")
            deltas.append(WeightDelta(module, m["layout"], left, right, dense, layer))
            if m.get("param", deltas[-1].param) != deltas[-1].param:
                raise ValueError(f"param {m.get('param')!r} is not {module}.weight")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ShiftEditError(
            f"{source}: the {what} metadata is incomplete or malformed ({type(exc).__name__}: {exc})"
        ) from None
    return deltas


def check_base(model: nn.Module, meta: dict[str, Any], source: str, base_check: BaseCheck = "model") -> None:
    """Refuse a model whose weights differ from the ones the patch was made against.

    ``base_check="model"``: the whole model's fingerprint must equal the base's (and every
    changed matrix its hash); ``"matrices"``: only the changed matrices are compared.
    """
    if base_check not in BASE_CHECKS:
        raise ShiftEditError(f"base_check must be one of {BASE_CHECKS}, got {base_check!r}")
    model_info = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    made_for = model_info.get("name_or_path") or model_info.get("model_type") or "?"
    params = dict(model.named_parameters())
    try:
        wanted = [(m["param"], m["base_sha256"]) for m in meta["modules"].values()]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ShiftEditError(
            f"{source}: the metadata is incomplete or malformed ({type(exc).__name__}: {exc})"
        ) from None
    for name, _ in wanted:
        if not isinstance(name, str) or name not in params:
            raise PatchMismatchError(f"{source} edits {name}, which this model does not have (patch made for "
                                     f"{made_for})")
    if base_check == "model":
        want = meta.get("base_fingerprint")
        if want is None:
            raise PatchMismatchError(
                f"{source} carries no whole-model base fingerprint (an old patch): apply it with "
                "base_check='matrices' (--base-check matrices), which compares only the matrices it changes"
            )
        if model_fingerprint(model) != want:
            raise PatchMismatchError(
                f"{source} was made for other base weights: this model's fingerprint differs from the base's "
                f"(patch made for {made_for!r}; another edit applied, another dtype or model?); load the "
                "unedited base model, or pass base_check='matrices' (--base-check matrices) to compare only "
                "the matrices the patch changes"
            )
    for name, sha in wanted:
        if tensor_hash(params[name]) != sha:
            raise PatchMismatchError(
                f"{source} was made for other base weights: {name} does not match its hash "
                f"(patch made for {made_for!r}); load that model, unedited"
            )
