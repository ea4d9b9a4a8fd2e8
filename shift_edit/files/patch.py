"""Edit patches: apply a small safetensors file holding an edit's factors (or a LoRA adapter
folder) to its base model, and revert it bit for bit.

The file layout, its checksum and the base check (``"model"``: the whole base fingerprint,
``"matrices"``: only the changed matrices, so patches of different layers stack) are
:mod:`shift_edit.files.patch_format`; its names are importable from here too. :func:`revert_patch`
restores the saved originals bit for bit.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from torch import nn

from ..core.deltas import DEFAULT_MAX_RELATIVE_NORM, WeightDelta, apply_deltas
from ..core.editing import all_or_nothing
from ..core.errors import ShiftEditError
from ..core.guard import check_outputs
from ..core.registry import get_algorithm
from ..core.requests import make_request
from ..core.result import EditResult
from .lora import read_lora
from .patch_format import (  # noqa: F401  (the format's names, importable from here as before)
    BASE_CHECKS,
    CHECKSUM_KEY,
    FORMAT,
    FORMAT_VERSION,
    LATER_FIELDS,
    BaseCheck,
    PatchChecksumError,
    check_base,
    check_old_format,
    deltas_from_tensors,
    patch_metadata,
    read_patch,
    save_patch,
    verify_checksum,
)

# model -> {patch key: EditResult}, for revert_patch(model, path)
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, dict[str, EditResult]]" = weakref.WeakKeyDictionary()


def read_edit(path: str | Path, *, allow_unchecksummed: bool = False) -> tuple[dict[str, Any], list[WeightDelta]]:
    """Read a patch file, or a PEFT adapter folder written by :func:`shift_edit.files.lora.export_lora`
    (``allow_unchecksummed``: also one of format 1, see :func:`read_patch`)."""
    if Path(path).is_dir():
        return read_lora(path, allow_unchecksummed=allow_unchecksummed)
    return read_patch(path, allow_unchecksummed=allow_unchecksummed)


def apply_patch(
    model: nn.Module, path: str | Path, *, tok=None, base_check: BaseCheck = "model", force: bool = False,
    allow_unchecksummed: bool = False,
) -> EditResult:
    """Apply a patch file (or an adapter folder from ``export_lora``) in place after checking
    its checksum and the base weights.

    Args:
        model: the base model the patch was made for.
        path: a patch file or an adapter folder.
        tok: the model's tokenizer: with it, the edit guard also checks that the patch's prompts
            give finite outputs (the relative-norm bound applies either way).
        base_check: ``"model"`` (default): the whole base fingerprint must match;
            ``"matrices"``: only the matrices the patch changes (see the module doc).
        force: skip the edit guard (:mod:`shift_edit.core.guard`); the checksum and base checks stay.
        allow_unchecksummed: apply a format-1 patch (written before checksums, so its content cannot be
            verified), with a warning; never one that carries a field of a later format.

    Returns:
        An :class:`EditResult` whose ``undo()`` (or :func:`revert_patch`) restores exactly.

    Raises:
        PatchChecksumError: the file's content does not match its checksum, or it is an unchecksummed
            format-1 file (without ``allow_unchecksummed``, or relabelled); nothing is applied.
        PatchMismatchError: the model's weights are not the ones the patch was made for.
        EditRefusedError: the edit guard refused the patch; the model is unchanged.
    """
    meta, deltas = read_edit(path, allow_unchecksummed=allow_unchecksummed)
    check_base(model, meta, str(path), base_check)
    try:
        alg = get_algorithm(meta["algorithm"])
        hparams = alg.hparams_class.from_dict(meta["hparams"], source=f"{path} (hparams)")
        requests = [make_request(r) for r in meta["requests"]]
        skipped = [bool(x) for x in meta.get("skipped", [])]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ShiftEditError(
            f"{path}: the patch metadata is incomplete or malformed ({type(exc).__name__}: {exc})"
        ) from None
    bound = None if force else getattr(hparams, "max_relative_norm", DEFAULT_MAX_RELATIVE_NORM)
    orig: dict = {}
    with all_or_nothing(model, orig):  # an interrupted or failed guard pass leaves the model as it was
        hashes = apply_deltas(model, deltas, max_relative_norm=bound, orig=orig)[1]
        if tok is not None and not force and requests:
            check_outputs(model, tok, [r.text for r in requests], orig)
        result = EditResult(
            model=model,
            algorithm=alg.name,
            hparams=hparams,
            requests=requests,
            deltas=deltas,
            orig_weights=orig,
            base_hashes=hashes,
            skipped=skipped,
        )
    _APPLIED.setdefault(model, {})[_key(path)] = result
    return result


def revert_patch(model: nn.Module, patch: str | Path | EditResult) -> None:
    """Undo a patch applied with :func:`apply_patch` (or any :class:`EditResult`), bit-exactly."""
    if isinstance(patch, EditResult):
        patch.undo()
        return
    result = _APPLIED.get(model, {}).get(_key(patch))
    if result is None:
        raise ShiftEditError(
            f"patch {patch} was not applied to this model in this process: "
            "exact revert needs the original weights; reload the base model instead"
        )
    result.undo()  # forgotten only once undone: an interrupted revert can be run again
    _APPLIED[model].pop(_key(patch), None)


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())

