"""CounterFact records (ROME format) for the studies, found through :mod:`shift_edit.files.data_files`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..core.errors import ShiftEditError
from ..files.data_files import find_data, require_data
from ..files.json_records import read_json_records

COUNTERFACT = "counterfact-original-format-subset837.json"
WIKITEXT = "wikitext-2-raw-v1/wiki.test.nonblank.raw"


def default_counterfact() -> Path:
    """The 837-record subset if found, else the full CounterFact (:mod:`shift_edit.files.data_files` order)."""
    return find_data("counterfact-subset") or require_data("counterfact")


def load_records(
    path: str | Path | None = None, n: int | None = None, *, sample_seed: int | None = None,
    case_ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """CounterFact records: the first ``n``, a seeded random sample of ``n``, or given case ids."""
    p = Path(path) if path else default_counterfact()
    if not p.is_file():
        raise ShiftEditError(f"CounterFact file not found: {p} (set SHIFT_EDIT_DATA or pass --data)")
    records = read_json_records(p)
    if case_ids:
        by_id = {r["case_id"]: r for r in records}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise ShiftEditError(f"case ids not in {p.name}: {missing}")
        return [by_id[c] for c in case_ids]
    if n is None:
        return records
    if sample_seed is not None:
        return random.Random(sample_seed).sample(records, min(n, len(records)))
    return records[:n]
