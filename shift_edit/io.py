"""Atomic file writes and the provenance every result file carries."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes private files; results are for sharing
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def _tmp_prefix(dest: Path) -> str:
    """Hidden siblings are named ``.<name>.<pid>.<random><suffix>``: the pid tells a later writer
    whether the process that made one is gone (killed while writing)."""
    return f".{dest.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return pid < 2**31  # someone else's process (or a pid we cannot check): keep its folder
    return True


def remove_stale_siblings(dest: Path) -> None:
    """Remove the hidden ``.tmp`` / ``.old`` siblings of ``dest`` left by writers that were killed
    (SIGKILL, power loss) while writing it; a live process's are never touched. (Called by
    :func:`atomic_dir` and :func:`atomic_file`, not by the per-record :func:`atomic_write_bytes`.)"""
    dest = Path(dest)
    head = f".{dest.name}."
    with contextlib.suppress(OSError):
        for p in dest.parent.iterdir():
            name = p.name
            if not (name.startswith(head) and name.endswith((".tmp", ".old"))):
                continue
            pid = name[len(head):].split(".", 1)[0]
            if pid.isdigit() and pid.isascii() and not _alive(int(pid)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, replace: bool = False, share: bool = False) -> Iterator[Path]:
    """Fill a folder all or nothing: yields an empty hidden sibling of ``dest`` to write into;
    when the block ends without an error it is renamed onto ``dest``, otherwise it is removed
    and ``dest`` is untouched.

    Args:
        dest: the folder to create; it may exist as an empty folder.
        replace: an existing non-empty ``dest`` is moved aside and deleted once the new folder
            is in place (without it, a non-empty ``dest`` is an ``OSError`` at the rename).
        share: give the folder and its files the usual permissions (``mkdtemp`` makes private ones).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_tmp_prefix(dest), suffix=".tmp"))
    old = None
    try:
        yield tmp
        if share:
            mask = _umask()
            os.chmod(tmp, 0o777 & ~mask)
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~mask)
        if replace and dest.exists() and any(dest.iterdir()):
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_tmp_prefix(dest), suffix=".old"))
            os.replace(dest, old)
        os.replace(tmp, dest)  # onto an absent or empty folder: atomic on POSIX
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_dir` for one file: yields a hidden sibling path (an empty file) to
    write; renamed onto ``dest`` when the block succeeds, removed otherwise."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(dest)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=_tmp_prefix(dest), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes (to checksum and then write with :func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (device independent)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # buffer protocol: no copy
    return h.hexdigest()


def content_sha256(tensors: dict[str, torch.Tensor], texts: list[str]) -> str:
    """sha256 over ``texts`` (metadata) and every tensor's name, dtype, shape and bytes, in name
    order: the checksum patches and adapters carry of their own content."""
    h = hashlib.sha256(b"shift_edit.content.v1\0")
    for text in texts:
        data = text.encode("utf-8")
        h.update(f"{len(data)}|".encode())
        h.update(data)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module, overrides: dict[str, torch.Tensor] | None = None) -> str:
    """A fast identity for a model's weights: sha256 over every parameter's name, shape,
    dtype, its first and last 1024 values and the float64 sums of its 2**20-value chunks.

    Not a cryptographic hash of all bytes (that takes minutes for 7B models), but any
    realistic difference in weights changes it. Summing chunk by chunk keeps the float64
    copy one chunk large (a whole-tensor sum copies the largest matrix: +226 MB on
    SmolLM2's embedding). Fingerprints made before 2026-12-01 summed whole tensors.
    ``overrides`` (state-dict name -> tensor) stand in for those entries: the fingerprint of
    the model as it was before an edit, from the edit's original weights.
    """
    h = hashlib.sha256()
    overrides = overrides or {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p = overrides.get(name, p)
            flat = p.detach().reshape(-1)
            h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
            for part in (flat[:1024], flat[-1024:]):
                h.update(part.contiguous().cpu().view(torch.uint8).numpy().tobytes())
            sums = [float(c.sum(dtype=torch.float64)) for c in flat.split(1 << 20)]
            h.update(repr(sums).encode())
    return h.hexdigest()[:16]


def git_info() -> dict[str, Any]:
    """The commit and dirty flag of the source checkout the package runs from, if any."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():  # an installed copy, not a checkout: no git state to record
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict[str, str]:
    """Versions of the packages that determine results."""
    out = {"shift_edit": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "numpy", "nltk", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def provenance(model: nn.Module | None = None) -> dict[str, Any]:
    """Versions, git state and (if given) the model's identity and fingerprint."""
    out: dict[str, Any] = {"versions": versions(), "git": git_info()}
    if model is not None:
        out["model"] = model_identity(model)
    return out


def model_identity(model: nn.Module) -> dict[str, Any]:
    config = model.config
    return {
        "name_or_path": getattr(model, "_shift_edit_name", None) or getattr(config, "_name_or_path", ""),
        "model_type": getattr(config, "model_type", type(model).__name__),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "fingerprint": model_fingerprint(model),
    }
