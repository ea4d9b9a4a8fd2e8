"""Case claims: two benchmark processes on the same run directory never compute the same case.

Before computing a case a worker creates ``.claim_<case>`` in the run directory with
``O_CREAT | O_EXCL`` (atomic, also on NFS v3+), holding its host name and pid; it removes the
file once the case file is written. A worker that finds a case claimed skips it (the other
worker writes it). A claim is *stale* when its owner is a process of this host that no longer
runs (a killed run): it is taken over, under the run directory's lock so that two workers
never both take over the same claim. Claims of other hosts are never broken: remove their
files by hand if that host is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path


def claim_path(run_dir: Path, case_id: int | str) -> Path:
    safe = str(case_id).replace("/", "_").replace(os.sep, "_")
    return Path(run_dir) / f".claim_{safe}"


def _owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _stale(path: Path) -> bool:
    """Whether the claim at ``path`` belongs to a dead process of this host (or is unreadable junk)."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # a claim whose writer died before finishing the write
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return True
    if owner.get("host") != socket.gethostname():
        return False
    return owner["pid"] != os.getpid() and not _alive(owner["pid"])


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(_owner(), fh)
    return True


def try_claim(run_dir: Path, case_ids: Sequence[int | str]) -> list[Path] | None:
    """Claim every case of ``case_ids`` (all or none); ``None`` if another live worker holds one."""
    run_dir = Path(run_dir)
    with open(run_dir / ".claims.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            taken: list[Path] = []
            for cid in case_ids:
                path = claim_path(run_dir, cid)
                if not _create(path):
                    if not _stale(path):
                        break
                    path.unlink(missing_ok=True)  # a dead worker's claim: take it over
                    if not _create(path):
                        break
                taken.append(path)
            else:
                return taken
            for path in taken:
                path.unlink(missing_ok=True)
            return None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def release(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def claimed(run_dir: Path, case_ids: Sequence[int | str]) -> Iterator[bool]:
    """``with claimed(run_dir, ids) as mine:`` -- ``mine`` is False when another worker has them;
    the claims are released on exit, also on an error."""
    paths = try_claim(run_dir, case_ids)
    try:
        yield paths is not None
    finally:
        if paths:
            release(paths)
