"""Export a run directory in ROME's, MEMIT's or EasyEdit's result format.

- ``rome``: one ``case_<id>.json`` per record as ROME's ``experiments/evaluate.py`` writes it:
  ``case_id``, ``requested_rewrite`` (targets as ``{str, id}``), ``time``, ``post`` with
  ``rewrite_prompts_probs`` / ``paraphrase_prompts_probs`` / ``neighborhood_prompts_probs``
  (lists of ``{"target_new": NLL, "target_true": NLL}``: mean token NLLs, which ROME calls
  "probs") and ``ngram_entropy`` where generated. ROME's ``summarize.py`` reads the folder.
- ``memit``: ``<num_edits>_edits-case_<id>.json`` with also ``grouped_case_ids``, ``num_edits``
  and the per-prompt strict top-1 lists ``*_prompts_correct`` (MEMIT's ``summarize.py``).
- ``easyedit``: one ``results.json`` list in EasyEdit's ``metrics`` layout. The bench measures
  strict top-1, not EasyEdit's token accuracy, so the values are strict top-1 and each is
  labelled in EasyEdit's own ``metric_meta`` with ``comparable_group`` ``shift_edit.strict_top1``
  (EasyEdit's summary warns when groups are mixed); ``locality.neighborhood_acc`` is the strict
  top-1 of the TRUE object, not EasyEdit's pre/post agreement.

Both also get the ``params.json`` that ROME's and MEMIT's ``evaluate.py`` copy into every run
folder: the run's hparams (ours, with ``alg_name``; none for ``--alg NONE``), so that the folder
has their run folder's shape; ``shift-edit summarize`` tells it from our own ``params.json`` by
its contents.

The unedited model's numbers are a separate run here (``--alg NONE``), so no ``pre`` is written.
``requested_rewrite`` is the data file's own record when the file recorded in ``params.json`` is
still there with the same sha256; otherwise it is rebuilt (target ``id``: null).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..bench.counterfact import case_file_stem
from ..bench.summarize import dataset_of, read_cases
from ..core.errors import ShiftEditError
from ..files.io import atomic_dir, atomic_write_json, file_sha256

log = logging.getLogger(__name__)

FORMATS = ("rome", "memit", "easyedit")
TOP1_GROUP = "shift_edit.strict_top1"


def _raw_records(params: dict[str, Any]) -> dict[str, dict]:
    data = params.get("data") or {}
    path = data.get("path")
    if not path or not Path(path).is_file():
        return {}
    try:
        if data.get("sha256") and file_sha256(Path(path)) != data["sha256"]:
            return {}
        recs = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(r.get("case_id")): r for r in recs if isinstance(r, dict)} if isinstance(recs, list) else {}


def _strip(s: str | None) -> str | None:
    return s[1:] if isinstance(s, str) and s.startswith(" ") else s


def requested_rewrite(case: dict[str, Any], raw: dict | None) -> dict[str, Any]:
    """ROME's ``requested_rewrite`` of a case (the data file's, when available)."""
    if raw is not None and isinstance(raw.get("requested_rewrite"), dict):
        return raw["requested_rewrite"]
    req = case["request"]
    prompt, subject = req["prompt"], req.get("subject")
    if subject and "{}" not in prompt and subject in prompt:
        prompt = prompt.replace(subject, "{}", 1)
    out = {"prompt": prompt, "subject": subject, "target_new": {"str": _strip(req["target_new"]), "id": None}}
    if req.get("target_true") is not None:
        out["target_true"] = {"str": _strip(req["target_true"]), "id": None}
    return out


def rome_case(case: dict[str, Any], raw: dict | None, *, memit: bool = False) -> dict[str, Any]:
    """One case in ROME's (``memit=True``: MEMIT's) case-file layout."""
    m = case["metrics"]
    post: dict[str, Any] = {}
    for group in ("rewrite", "paraphrase", "neighborhood"):
        if group in m.get("nll", {}):
            post[f"{group}_prompts_probs"] = m["nll"][group]
            if memit and group in m.get("top1_correct", {}):
                post[f"{group}_prompts_correct"] = m["top1_correct"][group]
    if "generation" in m:
        post["ngram_entropy"] = m["generation"]["ngram_entropy"]
        post["text"] = m["generation"].get("texts", [])
    out = {"case_id": case["case_id"], "requested_rewrite": requested_rewrite(case, raw),
           "time": case.get("time_s", {}).get("edit", 0.0), "post": post}
    if memit:
        batch = case.get("edit", {}).get("batch") or [case["case_id"]]
        out = {
            "case_id": case["case_id"],
            "grouped_case_ids": batch,
            "num_edits": len(batch),
            **{k: v for k, v in out.items() if k != "case_id"},
        }
    return out


def easyedit_case(case: dict[str, Any], index: int) -> dict[str, Any]:
    """One case in EasyEdit's ``metrics`` layout, values strict top-1 and labelled so."""
    m, req = case["metrics"], case["request"]
    top1 = m.get("top1", {})

    def meta(key: str) -> dict[str, str]:
        return {"result_key": key, "protocol": "shift_edit_strict_top1_teacher_forcing", "scorer": "all_tokens_argmax",
                "comparable_group": TOP1_GROUP}

    post: dict[str, Any] = {"rewrite_acc": [top1.get("rewrite_acc", 0.0)],
                            "metric_meta": {"rewrite": meta("rewrite_acc")},
                            "locality": {}, "portability": {}}
    reph = "rephrase_acc" if "rephrase_acc" in top1 else "paraphrase_acc" if "paraphrase_acc" in top1 else None
    if reph:
        post["rephrase_acc"] = [top1[reph]]
        post["metric_meta"]["rephrase"] = meta("rephrase_acc")
    if "neighborhood_acc" in top1:
        post["locality"]["neighborhood_acc"] = [top1["neighborhood_acc"]]
        post["metric_meta"]["locality.neighborhood"] = meta("locality.neighborhood_acc")
    if "generation" in m:
        post["fluency"] = {"ngram_entropy": m["generation"]["ngram_entropy"]}
    rr = {"prompt": req["prompt"].format(req["subject"]) if "{}" in req["prompt"] else req["prompt"],
          "target_new": _strip(req["target_new"]), "ground_truth": _strip(req.get("target_true")),
          "portability": {}, "locality": {}, "subject": req.get("subject")}
    return {"case_id": index, "requested_rewrite": rr, "time": case.get("time_s", {}).get("edit", 0.0), "post": post}


def export_run(run_dir: str | Path, out: str | Path, fmt: str) -> list[Path]:
    """Write ``run_dir``'s finished cases into ``out`` in format ``fmt``; returns the files written."""
    if fmt not in FORMATS:
        raise ShiftEditError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    try:
        params = json.loads((run_dir / "params.json").read_text())
    except (OSError, json.JSONDecodeError, RecursionError):
        raise ShiftEditError(f"{run_dir} is not a run directory (no readable params.json)") from None
    if not isinstance(params, dict):
        raise ShiftEditError(f"{run_dir} is not a run directory (its params.json is not an object)")
    dataset = dataset_of(params.get("match") or {})
    if dataset != "counterfact":
        raise ShiftEditError(f"{run_dir}: a {dataset} run (families zsre_token_acc / easyedit); export writes "
                             "CounterFact results in ROME's, MEMIT's or EasyEdit's format only")
    if out.resolve() == run_dir.resolve():
        raise ShiftEditError("export into a folder of its own, not the run directory (its case_*.json files are ours)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShiftEditError(f"{out}: exists and is not an empty folder")
    try:  # every file built before any is written: a damaged case writes nothing
        cases = read_cases(run_dir)
        if not cases:
            raise ShiftEditError(f"{run_dir} has no finished cases")
        files = _exported(run_dir, params, cases, fmt)
    except ShiftEditError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise ShiftEditError(f"{run_dir}: a case or params.json is damaged or not written by shift-edit bench "
                             f"({type(exc).__name__}: {str(exc)[:120]}); nothing was exported") from None
    with atomic_dir(out) as tmp:  # all files or none
        for name, rec in files.items():
            atomic_write_json(tmp / name, rec)
    return [out / name for name in files]


def _exported(run_dir: Path, params: dict[str, Any], cases: list[dict[str, Any]], fmt: str) -> dict[str, Any]:
    """``{file name: content}`` of the export of ``cases`` in format ``fmt``."""
    if fmt == "easyedit":
        return {"results.json": [easyedit_case(c, i) for i, c in enumerate(cases)]}
    raws = _raw_records(params)
    if fmt == "memit" and not all("top1_correct" in c["metrics"] for c in cases):
        log.warning("%s: cases written before per-prompt top-1 was recorded: no *_prompts_correct lists", run_dir)
    files: dict[str, Any] = {}
    for c in cases:
        rec = rome_case(c, raws.get(str(c["case_id"])), memit=fmt == "memit")
        stem = case_file_stem(c["case_id"])
        name = f"{rec['num_edits']}_edits-case_{stem}.json" if fmt == "memit" else f"case_{stem}.json"
        files[name] = rec
    hparams = params.get("match", {}).get("hparams")
    if isinstance(hparams, dict):  # the hparams file, as their evaluate.py copies it into the run folder
        files["params.json"] = hparams
    return files
