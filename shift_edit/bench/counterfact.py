"""CounterFact records: ROME's original format and EasyEdit's reduced format.

Both formats become :class:`CounterFactCase`. EasyEdit's ``rephrase_prompt`` is often one
of ROME's *generation* prompts rather than a paraphrase, so it is kept under its own name
(``rephrase_prompts``) and reported as ``rephrase_*`` metrics, never as paraphrase.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ShiftEditError
from ..core.requests import EditRequest, make_request, with_leading_space
from ..files.data_files import DATA_FILES, require_data
from ..files.io import atomic_write_json, file_sha256
from ..files.json_records import read_json_records
from ..model.loading import cache_dir

log = logging.getLogger(__name__)

#: The official full CounterFact file (21,919 records), as published by ROME.
COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
COUNTERFACT_SHA256 = "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"
COUNTERFACT_BYTES = 45_108_470
#: ``--data hf:NAME[:SPLIT]`` loads a hub dataset of CounterFact records (either format) via
#: ``datasets``; ``hf:`` alone means this one (ROME's format, all 21,919 records).
HUB_PREFIX = "hf:"
DEFAULT_HUB_DATASET = "azhx/counterfact"


@dataclass(frozen=True)
class CounterFactCase:
    """One benchmark record.

    Attributes:
        case_id: the record's id.
        request: the edit (``target_new``/``target_true`` carry their leading space).
        paraphrase_prompts: ROME's paraphrase prompts (empty for EasyEdit records).
        neighborhood_prompts: prompts about other subjects with the same true object.
        neighborhood_true: the object neighborhood prompts must still predict.
        generation_prompts: prompts for the n-gram entropy (empty for EasyEdit records).
        rephrase_prompts: EasyEdit's ``rephrase_prompt`` (empty for ROME records).
        source_format: ``"rome"`` or ``"easyedit"``.
    """

    case_id: int | str
    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_true: str = ""
    generation_prompts: tuple[str, ...] = ()
    rephrase_prompts: tuple[str, ...] = ()
    source_format: str = "rome"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rewrite_prompts(self) -> tuple[str, ...]:
        return (self.request.text,)


def _str_list(rec: Mapping[str, Any], key: str, where: str, *, required: bool) -> tuple[str, ...]:
    value = rec.get(key)
    if value is None:
        if required:
            raise ShiftEditError(f"{where}: missing field {key!r}")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ShiftEditError(f"{where}: field {key!r} must be a list of non-empty strings")
    return tuple(value)


def parse_case(rec: Any, index: int) -> CounterFactCase:
    """Turn one JSON record (either format) into a case; errors name the record."""
    where = f"record #{index}"
    if not isinstance(rec, Mapping):
        raise ShiftEditError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "case_id" in rec:
        shown = repr(rec["case_id"])
        where = f"record #{index} (case_id {shown[:40] + '...' if len(shown) > 43 else shown})"
    case_id = rec.get("case_id", index)
    if not isinstance(case_id, (int, str)) or isinstance(case_id, bool):
        raise ShiftEditError(f"{where}: case_id must be an int or string")
    check_case_id(case_id, where)
    try:
        if "requested_rewrite" in rec:
            rw = rec["requested_rewrite"]
            if not isinstance(rw, Mapping):
                raise ShiftEditError("requested_rewrite is not an object")
            for key in ("prompt", "subject", "target_new", "target_true"):
                if key not in rw:
                    raise ShiftEditError(f"requested_rewrite has no {key!r}")
            req = make_request({**rw, "case_id": case_id})
            return CounterFactCase(
                case_id=case_id,
                request=req,
                paraphrase_prompts=_str_list(rec, "paraphrase_prompts", where, required=True),
                neighborhood_prompts=_str_list(rec, "neighborhood_prompts", where, required=True),
                neighborhood_true=req.target_true,
                generation_prompts=_str_list(rec, "generation_prompts", where, required=False),
                source_format="rome",
                raw=dict(rec),
            )
        if "prompt" in rec and "target_new" in rec:
            if "ground_truth" not in rec:
                raise ShiftEditError("EasyEdit record has no 'ground_truth'")
            req = make_request({**rec, "case_id": case_id})
            loc_prompts = _str_list(rec, "locality_prompt", where, required=False)
            loc_true = rec.get("locality_ground_truth", rec.get("ground_truth"))
            if isinstance(loc_true, list):
                loc_true = loc_true[0] if loc_true else None
            if not isinstance(loc_true, str) or not loc_true.strip():
                raise ShiftEditError("locality_ground_truth must be a non-empty string")
            ntrue = with_leading_space(loc_prompts[0], loc_true) if loc_prompts else req.target_true
            return CounterFactCase(
                case_id=case_id,
                request=req,
                neighborhood_prompts=loc_prompts,
                neighborhood_true=ntrue,
                rephrase_prompts=_str_list(rec, "rephrase_prompt", where, required=False),
                source_format="easyedit",
                raw=dict(rec),
            )
    except ShiftEditError as exc:
        if str(exc).startswith(where):
            raise
        raise ShiftEditError(f"{where}: {exc}") from None
    raise ShiftEditError(
        f"{where}: neither ROME format (requested_rewrite, ...) nor EasyEdit format (prompt, target_new, ...)"
    )


#: the longest case id (in characters) a data file may use: its result file name must fit a file system's 255 bytes
MAX_CASE_ID_LENGTH = 120


def case_file_stem(case_id: int | str) -> str:
    """The part of a result file's name that comes from the case id (``case_<stem>.json``):
    the id with path separators replaced by ``_``. Two ids with the same stem are refused
    together by :func:`load_counterfact`, so results never overwrite each other."""
    return str(case_id).replace("/", "_").replace(os.sep, "_")


def check_case_id(case_id: int | str, where: str) -> None:
    """Refuse a case id that cannot name a result file: empty, control characters (NUL...), or too long."""
    text = str(case_id)
    if not text.strip():
        raise ShiftEditError(f"{where}: case_id is empty")
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ShiftEditError(f"{where}: case_id contains the control character {bad!r}; use printable ids")
    if len(text) > MAX_CASE_ID_LENGTH or len(case_file_stem(text).encode()) > 2 * MAX_CASE_ID_LENGTH:
        raise ShiftEditError(f"{where}: case_id is {len(text)} characters long, more than the {MAX_CASE_ID_LENGTH} "
                             "a result file name can hold; use shorter ids")


def _check_distinct(cases: list[CounterFactCase], path: str | Path) -> None:
    """Every case id distinct, and distinct as a result file name (``7`` and ``"7"``, ``a/b`` and ``a_b`` are not)."""
    by_stem: dict[str, int | str] = {}
    for c in cases:
        stem = case_file_stem(c.case_id)
        if stem in by_stem:
            other = by_stem[stem]
            what = "duplicate case_id" if other == c.case_id else "case ids"
            ids = f"{c.case_id!r}" if other == c.case_id else f"{other!r} and {c.case_id!r}"
            raise ShiftEditError(f"data file {path}: {what} {ids}: both would write the result file case_{stem}.json; "
                                 "give every record a distinct id")
        by_stem[stem] = c.case_id


def load_counterfact(
    path: str | Path,
    *,
    limit: int | None = None,
    start: int = 0,
    case_ids: Iterable[int | str] | None = None,
) -> list[CounterFactCase]:
    """Read a CounterFact JSON file (a list of records, either format) and select records.

    Args:
        path: the JSON file.
        limit: keep at most this many records (after ``start`` and ``case_ids``).
        start: skip this many records first (positions in the file).
        case_ids: keep only these case ids (in file order).

    Raises:
        ShiftEditError: missing, truncated or malformed file; a bad record (named); bad selection.
    """
    if not Path(path).is_file():
        raise ShiftEditError(f"data file {path} does not exist")
    if limit is not None and limit < 1:
        raise ShiftEditError(f"--limit must be >= 1, got {limit}")
    if start < 0:
        raise ShiftEditError(f"--start must be >= 0, got {start}")
    data = read_json_records(path, unwrap="data")
    cases = [parse_case(rec, i) for i, rec in enumerate(data)]
    _check_distinct(cases, path)
    cases = cases[start:]
    if case_ids is not None:
        wanted = {_norm_id(c) for c in case_ids}
        missing = wanted - {_norm_id(c.case_id) for c in cases}
        if missing:
            raise ShiftEditError(f"case ids not in {path} (after --start): {sorted(missing, key=str)[:10]}")
        cases = [c for c in cases if _norm_id(c.case_id) in wanted]
    if limit is not None:
        cases = cases[:limit]
    if not cases:
        raise ShiftEditError(f"no records selected from {path}")
    return cases


def _norm_id(x: int | str) -> str:
    return str(x).strip()


#: the most case ids ``--case-ids`` may select (ranges are checked against it before they are expanded)
MAX_CASE_IDS = 1_000_000


def parse_case_ids(text: str | None) -> list[str] | None:
    """``"1,5,7-9"`` -> ``["1", "5", "7", "8", "9"]``; errors are ShiftEditError."""
    if text is None:
        return None
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        ends = part.split("-")
        if len(ends) == 2 and all(e.isascii() and e.isdigit() for e in ends):
            a, b = (int(e) if len(e) <= 18 else -1 for e in ends)
            if a < 0 or b < a:
                raise ShiftEditError(f"--case-ids: bad range {part!r}")
            if b - a + 1 + len(out) > MAX_CASE_IDS:  # checked before the range is expanded
                raise ShiftEditError(f"--case-ids: {part!r} selects {b - a + 1:,} ids, more than the {MAX_CASE_IDS:,} "
                                     "allowed (CounterFact has 21,919 records); use --start/--limit for long runs")
            out.extend(str(i) for i in range(a, b + 1))
        else:
            out.append(part)
    if not out:
        raise ShiftEditError("--case-ids is empty")
    return out


def download_counterfact(
    cache: str | Path | None = None,
    *,
    url: str = COUNTERFACT_URL,
    sha256: str = COUNTERFACT_SHA256,
    size: int = COUNTERFACT_BYTES,
) -> Path:
    """Download the official CounterFact file into a cache folder (once) and check its sha256.

    Needs internet. The default cache is ``<shift_edit cache>/data``. A cached file with the
    right checksum is reused; a wrong checksum is an error and the bad download is removed.
    """
    folder = Path(cache) if cache is not None else cache_dir() / "data"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / "counterfact.json"
    if dest.is_file() and dest.stat().st_size == size and file_sha256(dest) == sha256:
        return dest
    tmp = folder / f".counterfact.json.{os.getpid()}.part"
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as fh:  # noqa: S310
            for block in iter(lambda: resp.read(1 << 20), b""):
                fh.write(block)
        got = file_sha256(tmp)
        if got != sha256:
            raise ShiftEditError(f"download of {url} has sha256 {got}, expected {sha256}")
        os.replace(tmp, dest)
    except OSError as exc:
        raise ShiftEditError(f"could not download {url}: {exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def fetch_hub_counterfact(spec: str, cache: str | Path | None = None) -> Path:
    """``hf:NAME[:SPLIT]`` -> a local JSON file of the dataset's records (cached).

    Loads the dataset with ``datasets.load_dataset`` (its own download cache applies) and
    writes its rows once, atomically, as ``<shift_edit cache>/data/hf/<NAME>-<SPLIT>.json``,
    which is then read like any local CounterFact file (sha256 recorded in ``params.json``).
    """
    name, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    name, split = name or DEFAULT_HUB_DATASET, split or "train"
    folder = Path(cache) if cache is not None else cache_dir() / "data" / "hf"
    dest = folder / f"{name.replace('/', '__')}-{split}.json"
    if dest.is_file():
        return dest
    try:
        import datasets
    except ImportError:
        raise ShiftEditError(f"--data {spec} needs the datasets package: pip install datasets") from None
    log.info("loading hub dataset %s (split %s) -> %s", name, split, dest)
    try:
        rows = [dict(r) for r in datasets.load_dataset(name, split=split)]
    except Exception as exc:  # datasets raises many types (network, missing split, schema)
        raise ShiftEditError(
            f"could not load hub dataset {name!r} split {split!r}: {type(exc).__name__}: {exc}"
        ) from None
    if not rows:
        raise ShiftEditError(f"hub dataset {name!r} split {split!r} has no records")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dest, rows)
    return dest


def resolve_data(spec: str) -> Path:
    """A ``--data`` value -> a local file: ``download`` (the official file, checksummed),
    ``hf:NAME[:SPLIT]`` (a hub dataset via ``datasets``) or a path."""
    if spec == "download":
        return download_counterfact()
    if spec.startswith(HUB_PREFIX):
        return fetch_hub_counterfact(spec)
    if spec in DATA_FILES and not Path(spec).exists():
        return require_data(spec)
    return Path(spec)
