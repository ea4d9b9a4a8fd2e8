"""Edit patches: a small safetensors file holding an edit's factors, not the model.

Layout of a patch file (``*.safetensors``):

- tensors ``"<module>.left"`` ``[out, r]`` and ``"<module>.right"`` ``[r, in]`` for
  low-rank deltas (canonical ``[out, in]`` orientation), or ``"<module>.dense"``;
- header metadata ``"shift_edit"``: JSON with the format version, algorithm,
  hparams, requests, the model's name and type, and per module its layout, layer,
  parameter name and the sha256 of the weight the patch was made against.

:func:`apply_patch` refuses a model whose weights do not match those hashes;
:func:`revert_patch` restores the saved originals bit for bit.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save as st_save
from torch import nn

from .deltas import EditResult, WeightDelta, apply_deltas
from .errors import PatchMismatchError, ShiftEditError
from .io import atomic_write_bytes, tensor_hash
from .registry import get_algorithm
from .requests import make_request

FORMAT = "shift_edit.patch"
FORMAT_VERSION = 1
_KINDS = ("left", "right", "dense")

# model -> {patch key: EditResult}, for revert_patch(model, path)
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, dict[str, EditResult]]" = weakref.WeakKeyDictionary()


def _model_name(model: nn.Module) -> str:
    return getattr(model, "_shift_edit_name", None) or getattr(model.config, "_name_or_path", "") or ""


def patch_metadata(result: EditResult) -> dict[str, Any]:
    """The JSON metadata stored with a patch."""
    from . import __version__

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


def save_patch(result: EditResult, path: str | Path) -> Path:
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
    meta = {"shift_edit": json.dumps(patch_metadata(result), sort_keys=True)}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    return path


def read_patch(path: str | Path) -> tuple[dict[str, Any], list[WeightDelta]]:
    """Read a patch file: ``(metadata, deltas)``; a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ShiftEditError(f"patch file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("shift_edit")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ShiftEditError(f"{path} is not a readable safetensors patch ({exc})") from exc
    if raw is None:
        raise ShiftEditError(f"{path} is a safetensors file but not a shift_edit patch (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ShiftEditError(f"{path}: the patch metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ShiftEditError(f"{path}: unsupported patch format {got}")
    deltas = []
    try:
        for module, m in meta["modules"].items():
            parts = {k: tensors.get(f"{module}.{k}") for k in _KINDS}
            deltas.append(WeightDelta(module, m["layout"], parts["left"], parts["right"], parts["dense"], m["layer"]))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ShiftEditError(f"{path}: the patch metadata is incomplete or malformed ({type(exc).__name__}: {exc})") from None
    return meta, deltas


def read_edit(path: str | Path) -> tuple[dict[str, Any], list[WeightDelta]]:
    """Read a patch file, or a PEFT adapter folder written by :func:`shift_edit.lora.export_lora`."""
    if Path(path).is_dir():
        from .lora import read_lora

        return read_lora(path)
    return read_patch(path)


def check_base(model: nn.Module, meta: dict[str, Any], source: str) -> None:
    """Refuse a model whose weights differ from the ones the patch was made against."""
    params = dict(model.named_parameters())
    for module, m in meta["modules"].items():
        p = params.get(m["param"])
        if p is None:
            raise PatchMismatchError(
                f"{source} edits {m['param']}, which this model does not have "
                f"(patch made for {meta['model']['name_or_path'] or meta['model']['model_type']})"
            )
        if tensor_hash(p) != m["base_sha256"]:
            raise PatchMismatchError(
                f"{source} was made for other base weights: {m['param']} does not match its hash "
                f"(patch made for {meta['model']['name_or_path']!r}); load that model, unedited"
            )


def apply_patch(model: nn.Module, path: str | Path) -> EditResult:
    """Apply a patch file (or an adapter folder from ``export_lora``) in place after checking the base weights.

    Returns:
        An :class:`EditResult` whose ``undo()`` (or :func:`revert_patch`) restores exactly.

    Raises:
        PatchMismatchError: the model's weights are not the ones the patch was made for.
    """
    meta, deltas = read_edit(path)
    check_base(model, meta, str(path))
    alg = get_algorithm(meta["algorithm"])
    hparams = alg.hparams_class.from_dict(meta["hparams"], source=f"{path} (hparams)")
    orig, hashes = apply_deltas(model, deltas)
    result = EditResult(
        model=model,
        algorithm=alg.name,
        hparams=hparams,
        requests=[make_request(r) for r in meta["requests"]],
        deltas=deltas,
        orig_weights=orig,
        base_hashes=hashes,
        skipped=list(meta.get("skipped", [])),
    )
    _APPLIED.setdefault(model, {})[_key(path)] = result
    return result


def revert_patch(model: nn.Module, patch: str | Path | EditResult) -> None:
    """Undo a patch applied with :func:`apply_patch` (or any :class:`EditResult`), bit-exactly."""
    if isinstance(patch, EditResult):
        patch.undo()
        return
    result = _APPLIED.get(model, {}).pop(_key(patch), None)
    if result is None:
        raise ShiftEditError(
            f"patch {patch} was not applied to this model in this process: "
            "exact revert needs the original weights; reload the base model instead"
        )
    result.undo()


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())

