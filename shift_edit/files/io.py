"""Atomic file writes, checksummed cache entries and the provenance every result file carries."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
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

from .._version import __version__
from ..core.errors import ShiftEditError

log = logging.getLogger(__name__)


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


class CacheCheckError(ShiftEditError):
    """A cache entry or saved state whose files are missing, unreadable, or do not match their checksums."""


_SUMS = ("sha256", "meta_sha256")


def _meta_sha256(meta: dict[str, Any]) -> str:
    text = json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_verified(pt: Path, meta_path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Write a checksummed cache entry: ``tensors`` (``torch.save``) to ``pt``, then ``meta`` plus the sha256 of
    the tensor file (``"sha256"``) and of the metadata itself (``"meta_sha256"``) to ``meta_path`` (the commit
    point), each atomically. Returns the metadata written. :func:`read_verified` reads it back."""
    data = torch_bytes(tensors)
    meta = {**{k: v for k, v in meta.items() if k not in _SUMS}, "sha256": hashlib.sha256(data).hexdigest()}
    meta["meta_sha256"] = _meta_sha256(meta)
    atomic_write_bytes(pt, data)
    atomic_write_json(meta_path, meta)
    return meta


def check_verified(pt: Path, meta_path: Path, expected: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A cache entry written by :func:`write_verified`: ``(metadata, tensors)`` if both files exist, the
    metadata holds ``expected``'s values and both checksums hold.

    Entries written before the metadata had its own checksum (no ``"meta_sha256"``) are read when their
    tensors match theirs and ``expected`` matches.

    Raises:
        CacheCheckError: what is wrong (missing, unreadable, mismatched field, failed checksum).
    """
    try:
        meta = json.loads(Path(meta_path).read_text())
        if not isinstance(meta, dict):
            raise ValueError("the metadata is not a JSON object")
        data = Path(pt).read_bytes()
    except (OSError, ValueError, RecursionError) as exc:
        raise CacheCheckError(f"is unreadable ({type(exc).__name__}: {exc})") from None
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_sha256(meta):
        raise CacheCheckError(f"fails its checksum (metadata {meta_path.name})")
    mismatched = [k for k, v in expected.items() if meta.get(k) != v]
    if mismatched:
        raise CacheCheckError(f"does not match ({', '.join(mismatched)})")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CacheCheckError(f"fails its checksum ({Path(pt).name})")
    try:
        return meta, torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a bad file
        raise CacheCheckError(f"is unreadable ({type(exc).__name__}: {exc})") from None


def read_verified(pt: Path, meta_path: Path, expected: dict[str, Any], what: str
                  ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """:func:`check_verified` for a cache entry that can be rebuilt: ``None`` when absent, and ``None`` with
    one warning naming ``what`` (and saying it is rebuilt) when it fails a check."""
    if not Path(pt).is_file() or not Path(meta_path).is_file():
        return None
    try:
        return check_verified(pt, meta_path, expected)
    except CacheCheckError as exc:
        log.warning("%s %s %s; rebuilding", what, pt, exc)
        return None


MANIFEST_NAME = "shift_edit_manifest.json"


def write_manifest(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Record the sha256 of every file in ``folder`` (and of ``meta`` itself) in its :data:`MANIFEST_NAME`;
    write it last, into a folder that is not in place yet (:func:`atomic_dir`). Returns the manifest."""
    folder = Path(folder)
    files = {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST_NAME}
    manifest = {**{k: v for k, v in meta.items() if k not in _SUMS}, "files": files}
    manifest["meta_sha256"] = _meta_sha256(manifest)
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def check_manifest(folder: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a folder written with :func:`write_manifest`, after checking that it holds ``expected``'s
    values, that its own checksum holds and that every file it names (and no other) has its sha256.

    Raises:
        CacheCheckError: what is wrong.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a manifest")
    except FileNotFoundError:
        raise CacheCheckError(f"has no {MANIFEST_NAME} (written before checksums)") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CacheCheckError(f"is unreadable ({type(exc).__name__}: {exc})") from None
    if manifest.get("meta_sha256") != _meta_sha256(manifest):
        raise CacheCheckError(f"fails its checksum ({MANIFEST_NAME})")
    mismatched = [k for k, v in expected.items() if manifest.get(k) != v]
    if mismatched:
        raise CacheCheckError(f"does not match ({', '.join(mismatched)})")
    present = {f.name for f in folder.iterdir() if f.is_file() and f.name != MANIFEST_NAME}
    if present != set(manifest["files"]):
        raise CacheCheckError(
            f"does not hold the files its manifest names ({sorted(present ^ set(manifest['files']))})"
        )
    for name, sha in manifest["files"].items():
        if file_sha256(folder / name) != sha:
            raise CacheCheckError(f"fails its checksum ({name})")
    return manifest


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
    root = Path(__file__).resolve().parent.parent.parent  # shift_edit/files/io.py -> the checkout
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
