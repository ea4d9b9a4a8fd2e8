"""Where data files come from: one resolution order for every command and study.

A data set is asked for by name (``counterfact``, ``counterfact-subset``, ``wikitext``):

1. an explicit path (``--data FILE``, ``--wikitext FILE``) wins;
2. then ``$SHIFT_EDIT_DATA`` (a folder; ``$SHIFT_EDIT_SHARED_DATA`` is read as an older name);
3. then the user cache, ``<shift_edit cache>/data`` (``$SHIFT_EDIT_CACHE`` or the platform's
   user cache folder), where ``shift-edit data fetch NAME`` puts downloads;
4. else an error saying how to get the file (``shift-edit data fetch NAME`` where a public
   source exists).

The library never looks beside its own installation for data. Downloads are checked
against a sha256 before they are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ShiftEditError
from ..model.loading import cache_dir
from .io import file_sha256

log = logging.getLogger(__name__)

ENV = "SHIFT_EDIT_DATA"
LEGACY_ENV = "SHIFT_EDIT_SHARED_DATA"


@dataclass(frozen=True)
class DataFile:
    """A named data set: where it lies inside a data folder and, if public, where to fetch it.

    Attributes:
        name: what users call it (``shift-edit data fetch NAME``).
        relpath: candidate paths inside a data folder, the first found wins.
        url: the public source (None: not downloadable).
        sha256 / size: of the downloaded bytes.
        post: turns the downloaded bytes into the stored file (e.g. CRLF -> LF).
        stored_sha256: of the stored file, after ``post``.
        git_blob: the git blob id (sha1 of ``blob <size>\\0`` + bytes) of the download, where that is what the
            source publishes instead of a sha256.
        description: one line for ``shift-edit data list``.
    """

    name: str
    relpath: tuple[str, ...]
    description: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    post: Callable[[bytes], bytes] | None = None
    stored_sha256: str | None = None
    git_blob: str | None = None


def _crlf_to_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


DATA_FILES: dict[str, DataFile] = {d.name: d for d in (
    DataFile(
        name="counterfact",
        relpath=("counterfact.json",),
        description="CounterFact, all 21,919 records in ROME's format (ROME's data server, 45 MB)",
        url="https://rome.baulab.info/data/dsets/counterfact.json",
        sha256="d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
        size=45_108_470,
    ),
    DataFile(
        name="counterfact-subset",
        relpath=("counterfact-original-format-subset837.json",),
        description="CounterFact, an 837-record subset in ROME's format (a local derived file; no download)",
    ),
    DataFile(
        name="wikitext",
        relpath=("wikitext-2-raw-v1/wiki.test.nonblank.raw",),
        description="WikiText-2 raw test split, its 2,891 non-blank lines, LF line ends (1.3 MB)",
        url=("https://raw.githubusercontent.com/Tylogi/TyloQuant/aa7023b3a96905a70f7a7ce9836834f02694c670/"
             "data/wikitext-2-raw/wiki.test.raw"),
        sha256="4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
        size=1_290_547,
        post=_crlf_to_lf,
        stored_sha256="bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
    ),
    DataFile(
        name="zsre",
        relpath=("zsre/zsre_mend_eval.json", "zsre/zsre-mend-eval-portability1037.json"),
        description="zsRE in MEND/ROME's format: the full eval file (19,086 records, fetched) or else the local "
                    "1,037-record file with portability",
        url="https://rome.baulab.info/data/dsets/zsre_mend_eval.json",
        git_blob="8546c90abc10b77ebc9fd69de178cf7837ff86dc",
    ),
    DataFile(name="knowedit-zsre", relpath=("knowedit/ZsRE-test-all.json",),
             description="KnowEdit's zsRE test set, 1,301 records (a local file; no download)"),
    DataFile(name="knowedit-recent", relpath=("knowedit/wiki_recent-train.json",),
             description="KnowEdit WikiData-recent, 570 records (a local file; no download)"),
    DataFile(name="knowedit-counterfact", relpath=("knowedit/wiki_counterfact-train.json",),
             description="KnowEdit WikiData-counterfact, 1,427 records (a local file; no download)"),
)}


def git_blob_id(path: Path) -> str:
    """The git blob id of a file: sha1 of ``blob <size>\\0`` followed by its bytes."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 (git's id, not a security use)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _good_copy(spec: DataFile, path: Path) -> bool:
    """Whether ``path`` is the stored file ``spec`` describes (by sha256, or else by git blob id)."""
    want = spec.stored_sha256 or spec.sha256
    if want is not None:
        return file_sha256(path) == want
    return spec.git_blob is not None and git_blob_id(path) == spec.git_blob


def env_data_dir() -> Path | None:
    """``$SHIFT_EDIT_DATA`` (or the older ``$SHIFT_EDIT_SHARED_DATA``), if set."""
    value = os.environ.get(ENV) or os.environ.get(LEGACY_ENV)
    return Path(value).expanduser() if value else None


def user_data_dir() -> Path:
    """The user cache folder for data: ``<shift_edit cache>/data``."""
    return cache_dir() / "data"


def search_dirs() -> list[Path]:
    """The data folders searched, in order."""
    env = env_data_dir()
    return [*([env] if env else []), user_data_dir()]


def _spec(name: str) -> DataFile:
    try:
        return DATA_FILES[name]
    except KeyError:
        raise ShiftEditError(f"unknown data set {name!r}; known: {', '.join(DATA_FILES)}") from None


def find_data(name: str, explicit: str | Path | None = None) -> Path | None:
    """The file of data set ``name`` by the resolution order above, or None if not found.

    Raises:
        ShiftEditError: ``explicit`` was given but is not a file, or ``name`` is unknown.
    """
    spec = _spec(name)
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise ShiftEditError(f"{name} file not found: {explicit}")
        return p
    for root in search_dirs():
        for rel in spec.relpath:
            p = root / rel
            if p.is_file():
                return p
    return None


def find_file(relpath: str | Path) -> Path | None:
    """The file ``relpath`` in the first data folder (:func:`search_dirs`) holding it, or None: for
    files of a data folder that are not a named data set (``counterfact-easyedit-edit.json``)."""
    for root in search_dirs():
        p = root / relpath
        if p.is_file():
            return p
    return None


def require_data(name: str, explicit: str | Path | None = None) -> Path:
    """Like :func:`find_data`, but a missing file is an error saying how to get it."""
    p = find_data(name, explicit)
    if p is not None:
        return p
    spec = _spec(name)
    where = " or ".join(str(d) for d in search_dirs())
    how = f"run `shift-edit data fetch {name}`, " if spec.url else ""
    raise ShiftEditError(f"no {name} data ({spec.relpath[0]}) in {where}: {how}set ${ENV} to a folder holding it, "
                         f"or pass the file explicitly")


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` (``file://`` URLs work too, for tests and mirrors)."""
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as fh:  # noqa: S310
        for block in iter(lambda: resp.read(1 << 20), b""):
            fh.write(block)


def fetch_data(name: str, dest_dir: str | Path | None = None, *, url: str | None = None,
               force: bool = False) -> Path:
    """Download data set ``name`` into ``dest_dir`` (default: the user cache), checking its sha256.

    A stored file with the right checksum is reused (no download). A download with the wrong
    checksum is removed and reported; nothing is left half-written.

    Args:
        name: a key of :data:`DATA_FILES` with a public source.
        dest_dir: the data folder to store into (the file goes to its usual relative path).
        url: another source of the same bytes (a mirror, a ``file://`` copy).
        force: download even if a good copy is stored.

    Raises:
        ShiftEditError: no public source, no connection, or a checksum mismatch.
    """
    spec = _spec(name)
    if spec.url is None:
        raise ShiftEditError(f"{name} has no public download; set ${ENV} to a folder holding {spec.relpath[0]}")
    root = Path(dest_dir).expanduser() if dest_dir is not None else user_data_dir()
    dest = root / spec.relpath[0]
    if dest.is_file() and not force and _good_copy(spec, dest):
        return dest
    src = url or spec.url
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    log.warning("downloading %s (%s) from %s", name, f"{spec.size / 1e6:.1f} MB" if spec.size else "size unknown", src)
    try:
        _download(src, tmp)
        if spec.sha256 is None:  # checked by its git blob id
            got = git_blob_id(tmp)
            if got != spec.git_blob:
                raise ShiftEditError(f"download of {src} has git blob id {got}, expected {spec.git_blob}; "
                                     "nothing was kept")
        elif (got := file_sha256(tmp)) != spec.sha256:
            raise ShiftEditError(f"download of {src} has sha256 {got}, expected {spec.sha256}; nothing was kept")
        if spec.post is not None:
            tmp.write_bytes(spec.post(tmp.read_bytes()))
            if spec.stored_sha256 and file_sha256(tmp) != spec.stored_sha256:
                raise ShiftEditError(f"{name}: the converted file does not have sha256 {spec.stored_sha256}")
        os.replace(tmp, dest)
    except OSError as exc:
        raise ShiftEditError(f"could not download {name} from {src}: {getattr(exc, 'reason', exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest
