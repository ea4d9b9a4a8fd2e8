"""The one reader of JSON record files (CounterFact in ROME's or EasyEdit's format, zsRE, KnowEdit):
a JSON list of records, with one clear error naming the file (and, for a damaged file, the record
where it breaks) instead of a traceback."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import ShiftEditError

_WS = re.compile(r"\s*")


def read_json_records(path: str | Path, *, unwrap: str | None = None) -> list[Any]:
    """The records of a JSON file holding a list of them.

    Args:
        path: the JSON file.
        unwrap: a key under which a JSON object may hold the list (``{"data": [...]}``).

    Raises:
        ShiftEditError: the file is missing, not UTF-8, not valid JSON (naming the first broken
            record when the damage is inside the list), or not a list.
    """
    p = Path(path)
    if not p.is_file():
        raise ShiftEditError(f"data file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ShiftEditError(f"data file {path} is not UTF-8 text: {exc}") from None
    except RecursionError:
        raise ShiftEditError(f"data file {path} nests JSON arrays/objects too deeply to read: "
                             "not a list of records") from None
    except json.JSONDecodeError as exc:
        where = bad_record(text)
        raise ShiftEditError(f"data file {path} is not valid JSON (truncated or malformed): "
                             f"{where + '; ' if where else ''}{exc}") from None
    if unwrap is not None and isinstance(data, Mapping) and unwrap in data:
        data = data[unwrap]
    if not isinstance(data, list):
        raise ShiftEditError(f"data file {path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def bad_record(text: str) -> str:
    """In a JSON list of records that does not parse, which record breaks it (``""`` if the
    damage is outside the list's elements)."""
    dec = json.JSONDecoder()
    pos = _WS.match(text, 0).end()
    if not text.startswith("[", pos):
        return ""
    pos, index, last_id = pos + 1, 0, None
    while True:
        pos = _WS.match(text, pos).end()
        if text.startswith("]", pos):
            return ""
        try:
            rec, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            after = f" (the one after case_id {last_id!r})" if last_id is not None else ""
            return f"record #{index}{after} is truncated or malformed"
        last_id = rec.get("case_id") if isinstance(rec, dict) else None
        index += 1
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            return f"after record #{index - 1} (case_id {last_id!r}) the list is cut off or malformed"
