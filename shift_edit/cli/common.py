"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from ..core.errors import ShiftEditError
from ..core.hparams import HyperParams
from ..core.registry import get_algorithm, load_hparams
from ..files.data_files import find_data
from ..files.io import atomic_dir
from ..model.loading import ALIASES, canonical_model_name, check_device, load_model, resolve_dtype


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"alias ({', '.join(ALIASES)}), .gguf file, local folder or hub id")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")


def check_model_args(args: argparse.Namespace) -> None:
    """Check --dtype and --device before anything is loaded; a ``--model`` that is an alias's own
    GGUF file becomes the alias (same weights: its converted copy and shipped hparams apply)."""
    resolve_dtype(args.dtype)
    check_device(args.device)
    args.model = canonical_model_name(args.model)


def load_from_args(args: argparse.Namespace):
    check_model_args(args)
    try:
        return load_model(args.model, dtype=args.dtype, device=args.device)
    except pickle.UnpicklingError as exc:
        raise ShiftEditError(
            f"refusing to load {args.model!r}: its pickle checkpoint (pytorch_model.bin) holds more than "
            f"weights and was not unpickled, for safety ({str(exc).splitlines()[0][:80]}); use a safetensors "
            "checkpoint"
        ) from None


def check_writable_parent(p: Path, flag: str) -> None:
    """``p`` can be created: its first existing ancestor is a writable folder (not a file)."""
    parent = p.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise ShiftEditError(f"{flag} {p}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise ShiftEditError(f"{flag} {p}: {parent} is a file, not a folder")
    _probe_write(parent, p, flag)


def _probe_write(folder: Path, p: Path, flag: str) -> None:
    """Create and remove a temporary file in ``folder``: the only reliable writability test
    (``os.access`` says yes to root on read-only file systems)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".shift_edit_probe."):
            pass
    except OSError as exc:
        raise ShiftEditError(f"{flag} {p}: cannot write in {folder} ({exc.strerror or exc})") from None


def check_new_dir(path: str | None, flag: str) -> Path | None:
    """A folder we may create or fill: not an existing file, not a non-empty folder, creatable."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ShiftEditError(f"{flag} {path}: exists and is not an empty folder")
    if p.is_dir():
        _probe_write(p, p, flag)
    check_writable_parent(p, flag)
    return p


def check_new_file(path: str | None, flag: str) -> Path | None:
    """A file path we may write: not a folder, its folder creatable and writable."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise ShiftEditError(f"{flag} {path}: is a folder, expected a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise ShiftEditError(f"{flag} {path}: exists and is not writable")
    check_writable_parent(p, flag)
    return p


def check_out_root(path: str, flag: str) -> Path:
    """A results root that may exist (runs are resumed in it): a folder or creatable, writable."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ShiftEditError(f"{flag} {path}: is a file, not a folder")
        _probe_write(p, p, flag)
        return p
    check_writable_parent(p, flag)
    return p


def check_top_k(top_k: int, model) -> None:
    """--top-k within 1..vocabulary size (checked after the load, before any edit)."""
    vocab = getattr(model.config, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise ShiftEditError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {top_k}")


def add_unchecksummed_argument(p: argparse.ArgumentParser) -> None:
    """``--allow-unchecksummed``: read a format-1 patch or adapter (written before checksums)."""
    p.add_argument("--allow-unchecksummed", action="store_true",
                   help="read a format-1 patch or adapter (written before checksums: its content cannot be verified); "
                        "one that carries a field of a later format is refused anyway")


def save_pretrained(model, tok, folder: Path) -> None:
    """``save_pretrained`` of the model and the tokenizer into ``folder``; a write error of safetensors (a full
    disk, which it reports as its own ``SafetensorError``) is an :class:`OSError` naming the folder, as any other
    write error is (the CLI: one line, exit code 2)."""
    try:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    except SafetensorError as exc:
        full = "No space left" in str(exc) or "StorageFull" in str(exc)
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      f"cannot write the model to {folder}: {'no space left on the device' if full else exc}") from exc


def save_model_atomically(model, tok, folder: Path) -> None:
    """save_pretrained into a temporary sibling folder, then move it into place (``folder``
    absent or empty); on an error the temporary folder is removed and ``folder`` is untouched."""
    with atomic_dir(folder) as tmp:
        save_pretrained(model, tok, tmp)


def format_topk(rows: list[tuple[str, float]]) -> str:
    return "  ".join(f"{t!r} {p:.3f}" for t, p in rows)

def parse_eval_at(text: str | None) -> list[int]:
    """``--eval-at N,N,...`` -> the checkpoints (empty: none)."""
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ShiftEditError(f"--eval-at takes comma-separated integers, got {text!r}") from None


def default_wikitext() -> str | None:
    """The local WikiText-2 test file by :mod:`shift_edit.files.data_files`'s order, or None."""
    p = find_data("wikitext")
    return str(p) if p is not None else None


def find_hparams(alg: str, model: str, given: str | None) -> HyperParams | None:
    """``given`` (the ``--hparams`` file) if set, else ``alg``'s shipped hparams for ``model``,
    loaded; None when there is neither.

    Raises:
        ShiftEditError: the file cannot be read or is not valid, or it is for another algorithm.
    """
    path = given or get_algorithm(alg).shipped_hparams(model)
    if path is None:
        return None
    hp = load_hparams(path)
    if type(hp).ALG_NAME != alg:
        raise ShiftEditError(f"--hparams {path} is for {type(hp).ALG_NAME}, not --alg {alg}")
    return hp
