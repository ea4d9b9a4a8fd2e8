"""zsRE and KnowEdit records for the benchmark: each record becomes one :class:`FactCase`.

Two formats, told apart by their fields (or named with ``--format``):

- ``zsre``: MEND/ROME's zsRE (``src``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``, ``subject``; the
  1,037-record file also has ``portability``). The edit is MEMIT's (``dsets/zsre.py``): the prompt ``src``,
  the subject, and the new object ``answers[0]`` (not ``alt``); it is scored in the ``zsre_token_acc`` family
  (:mod:`.fact_metrics`). Records are read through the facade's
  :class:`~shift_edit.compat.easyedit_datasets.ZsreDataset`
  checks (``loc`` starts with ``nq question:``), but records with an empty ``alt`` are kept, as MEMIT keeps them.
- ``knowedit``: KnowEdit's files (ZsRE, WikiData-recent, WikiData-counterfact), read with the facade's
  :class:`~shift_edit.compat.easyedit_datasets.KnowEditDataset`: ``subject``, ``prompt``, ``target_new``,
  ``ground_truth``,
  ``rephrase_prompt`` (ZsRE only), ``portability`` / ``locality`` sub-keys, each a list of
  ``{prompt, ground_truth}``; an answer given as a list of aliases (or a list of such lists) is scored on its
  first alias. Scored in the ``easyedit`` family through the facade's own request format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compat.easyedit_datasets import KnowEditDataset, ZsreDataset
from ..core.errors import ShiftEditError
from ..core.requests import EditRequest, make_request
from ..files.json_records import read_json_records

#: ``--data`` names of the data sets read here -> the name in :data:`shift_edit.files.data_files.DATA_FILES`
FACT_DATASETS = {"zsre": "zsre", "knowedit-zsre": "knowedit-zsre", "knowedit-recent": "knowedit-recent",
                 "knowedit-counterfact": "knowedit-counterfact"}
FORMATS = ("counterfact", "zsre", "knowedit")
#: KnowEdit's sub-keys, as the facade's KnowEditDataset names them
_PORT_KEYS = {"portability_r": "Reasoning", "portability_s": "Subject_Aliasing",
              "portability_l": "Logical_Generalization"}
_LOC_KEYS = {"locality_rs": "Relation_Specificity", "locality_f": "Forgetfulness"}


@dataclass(frozen=True)
class FactCase:
    """One zsRE or KnowEdit record.

    Attributes:
        case_id: the record's index in its file.
        request: the edit (``target_new`` with its leading space).
        source_format: ``"zsre"`` or ``"knowedit"``.
        ee_request: the EasyEdit request dict (``prompt``, ``target_new``, ``ground_truth``, ``subject``,
            ``rephrase_prompt``, ``locality``, ``portability``) the ``easyedit`` family scores (knowedit).
        zsre: MEMIT's fields (``answer``, ``rephrase``, ``loc``, ``loc_ans``) the ``zsre_token_acc`` family scores.
    """

    case_id: int
    request: EditRequest
    source_format: str
    ee_request: dict = field(default_factory=dict, compare=False)
    zsre: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """What a result file records about the record."""
        return {"case_id": self.case_id, "source_format": self.source_format, "request": self.request.to_dict(),
                **({"zsre": self.zsre} if self.zsre else {}),
                **({"easyedit_request": self.ee_request} if self.ee_request else {})}


def detect_format(records: Sequence[Any], path: str | Path) -> str:
    """``counterfact``, ``zsre`` or ``knowedit``, from the first record's fields."""
    first = records[0] if records else None
    if not isinstance(first, Mapping):
        raise ShiftEditError(f"{path}: record 0 is not a JSON object; cannot tell its format (pass --format)")
    if "requested_rewrite" in first or ("prompt" in first and "locality_prompt" in first):
        return "counterfact"
    if "src" in first and "loc_ans" in first:
        return "zsre"
    if "locality" in first and ("prompt" in first or "text" in first):
        return "knowedit"
    if "prompt" in first and "target_new" in first:
        return "counterfact"
    raise ShiftEditError(f"{path}: record 0 is neither CounterFact, zsRE (src, loc_ans) nor KnowEdit (prompt, "
                         "locality); pass --format")


def _first_alias(value: Any, where: str) -> str:
    """An answer, a list of aliases, or a list of alias lists -> its first string."""
    v = value
    while isinstance(v, list) and v:
        v = v[0]
    if not isinstance(v, str) or not v.strip():
        raise ShiftEditError(f"{where}: expected a non-empty answer (a string or a list of aliases), got {value!r:.80}")
    return v


def _entries(value: Any, where: str) -> tuple[list[str], list[str]] | None:
    """KnowEdit's list of ``{prompt, ground_truth}`` -> (prompts, first-alias answers); None if empty."""
    if not value:
        return None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise ShiftEditError(f"{where}: expected a list of {{prompt, ground_truth}}, got {type(value).__name__}")
    prompts, answers = [], []
    for j, e in enumerate(value):
        if not isinstance(e, Mapping) or not isinstance(e.get("prompt"), str) or "ground_truth" not in e:
            raise ShiftEditError(f"{where}[{j}]: expected {{prompt: string, ground_truth: ...}}")
        prompts.append(e["prompt"])
        answers.append(_first_alias(e["ground_truth"], f"{where}[{j}].ground_truth"))
    return prompts, answers


def _zsre_cases(path: Path, raw: list[Any]) -> list[FactCase]:
    ZsreDataset(path)  # the facade's checks of every record (fields, 'nq question: '), one line naming it
    out = []
    for i, rec in enumerate(raw):
        where = f"{path}: record {i}"
        try:
            answer = _first_alias(rec["answers"], "answers")
            for key in ("src", "rephrase", "loc", "loc_ans", "subject"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise ShiftEditError(f"field {key!r} must be a non-empty string")
            req = make_request({"prompt": rec["src"], "subject": rec["subject"], "target_new": answer, "case_id": i})
        except (ShiftEditError, KeyError) as exc:
            raise ShiftEditError(
                f"{where} (zsre): {exc if isinstance(exc, ShiftEditError) else f'no field {exc}'}"
            ) from None
        out.append(FactCase(i, req, "zsre", zsre={"answer": answer, "rephrase": rec["rephrase"], "loc": rec["loc"],
                                                  "loc_ans": rec["loc_ans"]}))
    return out


def _knowedit_cases(path: Path, raw: list[Any]) -> list[FactCase]:
    items = list(KnowEditDataset(path))  # the facade's reader: one line naming file and record
    out = []
    for i, (rec, item) in enumerate(zip(raw, items)):
        where = f"{path}: record {i}"
        try:
            target = _first_alias(item["target_new"], "target_new")
            truth = item.get("ground_truth")
            truth = _first_alias(truth, "ground_truth") if truth else None
            ee: dict[str, Any] = {"prompt": item["prompt"], "target_new": target, "ground_truth": truth,
                                  "subject": item["subject"], "locality": {}, "portability": {}}
            if isinstance(rec.get("rephrase_prompt"), str):
                ee["rephrase_prompt"] = rec["rephrase_prompt"]
            for keys, section in ((_LOC_KEYS, "locality"), (_PORT_KEYS, "portability")):
                for ours, theirs in keys.items():
                    got = _entries(item.get(ours), f"{section}.{theirs}")
                    if got is not None:
                        ee[section][theirs] = {"prompt": got[0], "ground_truth": got[1]}
            req = make_request({"prompt": item["prompt"], "subject": item["subject"], "target_new": target,
                                "ground_truth": truth, "case_id": i})
        except ShiftEditError as exc:
            raise ShiftEditError(f"{where} (knowedit): {exc}") from None
        out.append(FactCase(i, req, "knowedit", ee_request=ee))
    return out


def load_facts(path: str | Path, *, fmt: str | None = None, limit: int | None = None, start: int = 0) -> list[FactCase]:
    """Read a zsRE or KnowEdit file (``fmt``: ``zsre`` / ``knowedit``, default: detected) and select records.

    Raises:
        ShiftEditError: missing or malformed file; a malformed record (one line naming the file and index).
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ShiftEditError(f"--limit must be >= 1, got {limit}")
    if start < 0:
        raise ShiftEditError(f"--start must be >= 0, got {start}")
    raw = read_json_records(path)
    fmt = fmt or detect_format(raw, path)
    if fmt not in ("zsre", "knowedit"):
        raise ShiftEditError(f"{path}: format {fmt!r} is not read here (zsre, knowedit)")
    cases = (_zsre_cases if fmt == "zsre" else _knowedit_cases)(path, raw)[start:]
    if limit is not None:
        cases = cases[:limit]
    if not cases:
        raise ShiftEditError(f"no records selected from {path}")
    return cases
