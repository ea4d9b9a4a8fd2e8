"""Readers of EasyEdit's dataset JSON files, with EasyEdit's class names and item fields
(zjunlp/EasyEdit ``easyeditor/dataset/{counterfact,zsre,knowedit}.py`` at commit 14cea82).

``CounterFactDataset(path, size=None)`` yields EasyEdit's CounterFact records as stored
(``case_id``, ``prompt``, ``target_new``, ``subject``, ``ground_truth``, ``rephrase_prompt``,
``locality_prompt``, ``locality_ground_truth``); ``ZsreDataset`` maps zsRE's ``src``/``alt``/
``answers``/``rephrase``/``loc``/``loc_ans`` to those names (records with an empty ``alt`` are
left out, ``case_id`` is the record's index); ``KnowEditDataset`` gives ``subject``, ``prompt``,
``target_new``, ``ground_truth``, ``portability_r``/``_s``/``_l`` and ``locality_rs``/``_f``.
A file that is not what the class reads is a :class:`ShiftEditError` naming it and the record.
The training collators of EasyEdit's meta-learning methods are not provided.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..core.errors import ShiftEditError
from ..files.json_records import read_json_records


class _JsonDataset:
    """A list of records read from one JSON file (``size``: only the first ``size``)."""

    def __init__(self, data_dir: str | Path, size: int | None = None, config: Any = None, *args: Any,
                 **kwargs: Any) -> None:
        path = Path(data_dir)
        try:
            raw = read_json_records(path)
        except ShiftEditError as exc:
            raise ShiftEditError(f"{type(self).__name__}: {exc}") from None
        self.path = path
        self.config = config
        data = []
        for i, rec in enumerate(raw):
            if not isinstance(rec, Mapping):
                raise ShiftEditError(f"{path}: record {i} is not an object")
            try:
                item = self._convert(i, rec)
            except KeyError as exc:
                raise ShiftEditError(f"{path}: record {i} has no field {exc} ({type(self).__name__})") from None
            except (ValueError, TypeError, IndexError) as exc:
                raise ShiftEditError(f"{path}: record {i}: {exc} ({type(self).__name__})") from None
            if item is not None:
                data.append(item)
        self._data = data[:size] if size is not None else data

    def _convert(self, i: int, rec: Mapping[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self._data[item]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._data)


class CounterFactDataset(_JsonDataset):
    """EasyEdit's CounterFact JSON (``counterfact-edit.json`` etc.), records as stored."""

    def _convert(self, i: int, rec: Mapping[str, Any]) -> dict[str, Any]:
        for key in ("prompt", "target_new"):
            rec[key]  # noqa: B018  (a KeyError names the missing field)
        return dict(rec)


class ZsreDataset(_JsonDataset):
    """EasyEdit's zsRE JSON (``zsre_mend_eval.json``): ``src``, ``alt``, ``answers``, ``rephrase``,
    ``loc`` (starting with ``nq question:``), ``loc_ans``."""

    def _convert(self, i: int, rec: Mapping[str, Any]) -> dict[str, Any] | None:
        if "nq question: " not in rec["loc"]:
            raise ValueError("its locality prompt (loc) does not start with 'nq question: '")
        if rec["alt"] == "":
            return None
        return {
            "case_id": i,
            "prompt": rec["src"],
            "target_new": rec["alt"],
            "ground_truth": rec["answers"][0],
            "rephrase_prompt": rec["rephrase"],
            "locality_prompt": rec["loc"],
            "locality_ground_truth": rec["loc_ans"],
            "cond": f"{rec['answers'][0]} >> {rec['alt']} || {rec['src']}",
        }


class KnowEditDataset(_JsonDataset):
    """EasyEdit's KnowEdit JSON (ZsRE, WikiData_counterfact, wiki_recent, WikiBio)."""

    def _convert(self, i: int, rec: Mapping[str, Any]) -> dict[str, Any]:
        port = rec.get("portability") or {}
        loc = rec["locality"]
        return {
            "subject": rec["subject"] if "subject" in rec else rec["concept"],
            "prompt": rec["prompt"] if "prompt" in rec else rec["text"],
            "target_new": rec["target_new"] if "target_new" in rec else rec["labels"],
            "ground_truth": rec.get("ground_truth"),
            "portability_r": port.get("Reasoning"),
            "portability_s": port.get("Subject_Aliasing"),
            "portability_l": port.get("Logical_Generalization"),
            "locality_rs": loc.get("Relation_Specificity"),
            "locality_f": loc.get("Forgetfulness"),
        }
