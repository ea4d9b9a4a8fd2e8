"""Summaries of result folders written by other toolkits, as rows of ``shift-edit summarize``.

- A ROME run folder (``case_<id>.json`` files holding ``case_id``, ``requested_rewrite``, ``post``)
  or a MEMIT one (``<n>_edits-case_<id>.json``, also ``grouped_case_ids`` and ``num_edits``), each
  usually with the ``params.json`` their ``experiments/evaluate.py`` copies in (the hparams file:
  ``layers``, ``v_lr``, ``rewrite_module_tmp``, ...): ES/PS/NS and EM/PM/NM computed as ROME's and
  MEMIT's ``experiments/summarize.py`` do (success = ``target_true > target_new`` NLL,
  neighborhood the reverse; magnitude = difference of ``exp(-NLL)``), strict top-1 from MEMIT's
  ``*_prompts_correct``, ``ngram_entropy``; S = harmonic mean of the mean ES, PS, NS.
- An EasyEdit result JSON (the ``metrics`` list EasyEdit returns, dumped to a file): the post-edit
  means of ``rewrite_acc``, ``rephrase_acc``, each ``locality``/``portability`` key and fluency,
  as EasyEdit token accuracy (its own family; not comparable to the above).

A folder's format is read from its contents, never from a file name alone: our ``params.json``
records our protocol (``match`` with ``alg``, ``model``, ``protocol``) where ROME's and MEMIT's
hold their hparams, and our case files hold ``request`` and ``metrics`` where theirs hold
``case_id`` and ``post``. A folder that reads two ways is one :class:`ShiftEditError` line naming
both readings, as is anything else that is not a result folder or file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..bench.summarize import harmonic_mean, read_cases, stats, summarize_run
from ..core.errors import ShiftEditError
from ..core.registry import run_tag

ROME_FAMILY = ("read from ROME/MEMIT case files: ES/PS/NS from post.*_prompts_probs (mean token NLLs), "
               "top-1 from *_prompts_correct")
EASYEDIT_FAMILY = "EasyEdit token accuracy (post.rewrite_acc etc. of an EasyEdit metrics list)"

#: case-file names: ROME's evaluate.py writes ``case_<id>.json``, MEMIT's ``<num_edits>_edits-case_<id>.json``
_ROME_NAME = re.compile(r"case_(.+)\.json")
_MEMIT_NAME = re.compile(r"(\d+)_edits-case_(.+)\.json")

#: how each reading of a folder is named in messages and labels
_READING = {"ours": "a shift_edit run folder", "rome": "a ROME run folder", "memit": "a MEMIT run folder"}
_FORMAT_LABEL = {"rome": "ROME", "memit": "MEMIT"}


def _load(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ShiftEditError(f"{p}: unreadable or not JSON") from None


def _named_case_files(d: Path) -> tuple[list[Path], list[Path]]:
    """The folder's ``case_<id>.json`` and ``<n>_edits-case_<id>.json`` files, by name (hidden temp files skipped)."""
    rome: list[Path] = []
    memit: list[Path] = []
    for p in sorted(d.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or not p.is_file():
            continue
        if _ROME_NAME.fullmatch(p.name):
            rome.append(p)
        elif _MEMIT_NAME.fullmatch(p.name):
            memit.append(p)
    return rome, memit


def _case_layouts(data: Any) -> set[str]:
    """``"ours"`` (``request`` and ``metrics``) and/or ``"theirs"`` (ROME/MEMIT: ``case_id`` and ``post``)."""
    out: set[str] = set()
    if isinstance(data, dict):
        if isinstance(data.get("request"), dict) and isinstance(data.get("metrics"), dict):
            out.add("ours")
        if "case_id" in data and isinstance(data.get("post"), dict):
            out.add("theirs")
    return out


def _is_our_params(data: dict[str, Any]) -> bool:
    match = data.get("match")
    return isinstance(match, dict) and {"alg", "model", "protocol"} <= set(match)


def _read_params(d: Path) -> dict[str, Any] | None:
    """The folder's ``params.json`` as an object (``None`` when there is none)."""
    p = d / "params.json"
    if not p.is_file():
        return None
    data = _load(p)
    if not isinstance(data, dict):
        raise ShiftEditError(f"{p}: neither our run parameters nor a ROME/MEMIT hparams object (a JSON "
                             f"{type(data).__name__}, not an object)")
    if "match" in data and not _is_our_params(data):
        raise ShiftEditError(f"{p}: a 'match' without alg, model and protocol: a damaged shift_edit params.json")
    return data


def _keys(data: dict[str, Any], n: int = 4) -> str:
    keys = list(data)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _evidence(d: Path) -> list[tuple[frozenset[str], str]]:
    """What the folder's contents say it is: (the readings a piece of evidence allows, the evidence)."""
    ev: list[tuple[frozenset[str], str]] = []
    params = _read_params(d)
    if params is not None:
        if _is_our_params(params):
            model = params["match"]["model"]
            name = model.get("name", "?") if isinstance(model, dict) else model
            ev.append((frozenset({"ours"}),
                       f"params.json records our protocol: alg {params['match']['alg']}, model {name}"))
        else:
            ev.append((frozenset({"rome", "memit"}), f"params.json holds their hparams: {_keys(params)}"))
    rome_named, memit_named = _named_case_files(d)
    for files, named in ((rome_named, "rome"), (memit_named, "memit")):
        if not files:
            continue
        first = files[0]  # the first file gives the reading; the reader then checks every file
        layouts = _case_layouts(_load(first))
        if "ours" in layouts and named == "rome":  # our runner writes case_<id>.json only
            ev.append((frozenset({"ours"}), f"{first.name} holds request and metrics"))
        if "theirs" in layouts:
            ev.append((frozenset({named}), f"{first.name} holds case_id and post"))
        if not layouts or (layouts == {"ours"} and named == "memit"):
            raise ShiftEditError(f"{first}: neither a shift_edit case file (request, metrics) nor a ROME/MEMIT one "
                                 "(case_id, post)")
    return ev


def _reading(formats: frozenset[str]) -> str:
    """The reading a piece of evidence allows, in words (their hparams fit ROME and MEMIT alike)."""
    return "a ROME/MEMIT run folder" if len(formats) > 1 else _READING[next(iter(formats))]


def kind_of(path: str | Path) -> str:
    """What ``path`` holds, read from its contents: ``"ours"`` (our run folder), ``"rome"`` (ROME
    run folder), ``"memit"`` (MEMIT run folder) or ``"easyedit"`` (a result JSON file).

    Raises:
        ShiftEditError: no such path, no result folder, or a folder that reads two ways (the message
            names both readings and what each rests on).
    """
    p = Path(path)
    if p.is_file():
        return "easyedit"
    if not p.is_dir():
        raise ShiftEditError(f"{p}: no such run folder or result file")
    ev = _evidence(p)
    if not ev:
        raise ShiftEditError(f"{p}: not a run folder (no params.json, no case_<id>.json or <n>_edits-case_<id>.json "
                             f"files)")
    common = frozenset.intersection(*(f for f, _ in ev))
    if not common:
        # name each reading by its most specific evidence (their hparams fit ROME and MEMIT alike)
        kept = [(f, why) for f, why in ev if not any(g < f for g, _ in ev)]
        readings: dict[frozenset[str], list[str]] = {}
        for f, why in kept:
            readings.setdefault(f, []).append(why)
        told = " and as ".join(f"{_reading(f)} ({'; '.join(whys)})" for f, whys in readings.items())
        raise ShiftEditError(f"{p}: ambiguous run folder: it reads as {told}; keep each format in a folder of its own")
    if len(common) > 1:
        raise ShiftEditError(f"{p}: {_reading(common)} ({ev[0][1]}) without case files yet")
    kind = next(iter(common))
    if kind == "ours" and not (p / "params.json").is_file():
        raise ShiftEditError(f"{p}: shift_edit case files ({ev[0][1]}) but no params.json recording the run's protocol")
    return kind


def _rome_cases(d: Path, fmt: str) -> list[dict[str, Any]]:
    """Every case of a ROME (``fmt="rome"``) or MEMIT (``"memit"``) run folder, each checked to be theirs."""
    rome_named, memit_named = _named_case_files(d)
    cases = []
    for f in rome_named if fmt == "rome" else memit_named:
        c = _load(f)
        layouts = _case_layouts(c)
        if "theirs" not in layouts:
            found = (
                "a shift_edit case file (request, metrics)"
                if layouts
                else "not a ROME/MEMIT case file (no case_id and post)"
            )
            raise ShiftEditError(f"{f}: {found} in {_READING[fmt]}: keep each format in a folder of its own")
        cases.append(c)
    return cases


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _rome_values(post: dict[str, Any], where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for group, col, mcol in (("rewrite", "ES", "EM"), ("paraphrase", "PS", "PM")):
            rows = post.get(f"{group}_prompts_probs")
            if rows:
                out[col] = _mean([float(x["target_true"] > x["target_new"]) for x in rows])
                out[mcol] = _mean([math.exp(-x["target_new"]) - math.exp(-x["target_true"]) for x in rows])
        rows = post.get("neighborhood_prompts_probs")
        if rows:
            out["NS"] = _mean([float(x["target_true"] < x["target_new"]) for x in rows])
            out["NM"] = _mean([math.exp(-x["target_true"]) - math.exp(-x["target_new"]) for x in rows])
        for group, col in (("rewrite", "efficacy_top1"), ("paraphrase", "paraphrase_top1"),
                           ("neighborhood", "neighborhood_top1")):
            vals = post.get(f"{group}_prompts_correct")
            if vals:
                out[col] = _mean([float(v) for v in vals])
        if isinstance(post.get("ngram_entropy"), (int, float)):
            out["ngram_entropy"] = float(post["ngram_entropy"])
    except (KeyError, TypeError):
        raise ShiftEditError(
            f"{where}: malformed post metrics (expected lists of {{target_new, target_true}})"
        ) from None
    return out


def _rows_stats(per_case: list[dict[str, float]], scale: dict[str, float]) -> dict[str, Any]:
    cols = sorted({k for c in per_case for k in c})
    return {k: stats([c[k] * scale.get(k, 100.0) for c in per_case if k in c]) for k in cols}


def summarize_rome_dir(d: str | Path, *, case_ids: set[str] | None = None, limit: int | None = None,
                       fmt: str | None = None) -> dict[str, Any]:
    """A summary row of a ROME or MEMIT run folder (post-edit numbers).

    Args:
        case_ids: only these records (``str(case_id)``).
        limit: only the first ``limit`` records by case id (after ``case_ids``).
        fmt: ``"rome"`` or ``"memit"``; read from the folder's contents when not given.

    Returns:
        The row; its ``protocol`` keeps the folder's format, the hparams of its ``params.json``
        (``None`` without one) and the batch sizes (``num_edits``) of MEMIT's files.
    """
    d = Path(d)
    fmt = fmt or kind_of(d)
    if fmt not in _FORMAT_LABEL:
        raise ShiftEditError(f"{d}: not a ROME/MEMIT run folder (it reads as {_READING.get(fmt, fmt)})")
    hparams = _read_params(d)
    cases = _rome_cases(d, fmt)
    if case_ids is not None:
        cases = [c for c in cases if str(c["case_id"]) in case_ids]
    cases.sort(key=lambda c: (0, c["case_id"], "") if isinstance(c["case_id"], int) else (1, 0, str(c["case_id"])))
    if limit is not None:
        cases = cases[:limit]
    if not cases:
        raise ShiftEditError(f"{d} has no case files" + (" in the selection" if case_ids or limit else ""))
    per_case = [_rome_values(c["post"], str(d / f"case {c['case_id']}")) for c in cases]
    metrics = _rows_stats(per_case, {})
    es, ps, ns = (metrics.get(k, {}).get("mean") for k in ("ES", "PS", "NS"))
    if es is not None and ps is not None and ns is not None:
        metrics["S"] = {"n": len(cases), "mean": harmonic_mean([es, ps, ns]), "std": None, "ci95": None}
    where = f"{d.parent.name}/{d.name}" if d.parent.name else d.name
    alg = d.parent.name or "?"  # ROME's and MEMIT's results/<ALG>/run_<NNN>
    named = hparams.get("alg_name") if hparams is not None else None  # EasyEdit's and our hparams name it
    if isinstance(named, str) and named:
        where += f": {named}" if named != alg else ""
        alg = named
    try:
        tag = run_tag(alg, hparams)
    except (TypeError, ValueError):  # hparams this toolkit does not read: no tag
        tag = ""
    batches = sorted({c["num_edits"] for c in cases if isinstance(c.get("num_edits"), int)})
    batch = f", {'/'.join(map(str, batches))} edits per batch" if batches and batches != [1] else ""
    return {"label": f"{_FORMAT_LABEL[fmt]}-format folder ({where}{tag}{batch}, N={len(cases)})",
            "kind": "measured", "run_dir": str(d), "alg": alg, "model": "not recorded", "n": len(cases),
            "metrics": metrics, "case_ids": [c["case_id"] for c in cases],
            "protocol": {"metric_families": ROME_FAMILY, "format": fmt, "hparams": hparams,
                         **({"num_edits": batches} if fmt == "memit" else {})}}


def summarize_easyedit_file(
    p: str | Path, *, case_ids: set[str] | None = None, limit: int | None = None
) -> dict[str, Any]:
    """A summary row of an EasyEdit result JSON (post-edit means, EasyEdit token accuracy)."""
    p = Path(p)
    data = _load(p)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(m, dict) and isinstance(m.get("post"), dict)
                                                          and "rewrite_acc" in m["post"] for m in data):
        raise ShiftEditError(f"{p}: not an EasyEdit result file (a list of metrics with post.rewrite_acc)")
    if case_ids is not None:
        data = [m for i, m in enumerate(data) if str(m.get("case_id", i)) in case_ids]
    if limit is not None:
        data = data[:limit]
    if not data:
        raise ShiftEditError(f"{p}: no records in the selection")
    per_case: list[dict[str, float]] = []
    try:
        for m in data:
            post, row = m["post"], {}
            for key, col in (("rewrite_acc", "ee_rewrite_acc"), ("rephrase_acc", "ee_rephrase_acc")):
                v = post.get(key)
                if v is not None and v != []:
                    row[col] = _mean([float(x) for x in v]) if isinstance(v, list) else float(v)
            for section in ("locality", "portability"):
                accs = [_mean([float(x) for x in v]) for k,
                        v in (post.get(section) or {}).items() if k.endswith("_acc") and v]
                if accs:
                    row[f"ee_{section}"] = _mean(accs)
            if isinstance(post.get("fluency"), dict) and "ngram_entropy" in post["fluency"]:
                row["ee_fluency"] = float(post["fluency"]["ngram_entropy"])
            per_case.append(row)
    except (TypeError, ValueError):
        raise ShiftEditError(
            f"{p}: malformed EasyEdit metrics (accuracies must be numbers or lists of numbers)"
        ) from None
    groups = sorted({meta.get("comparable_group", "?") for m in data
                     for meta in (m["post"].get("metric_meta") or {}).values() if isinstance(meta, dict)})
    return {"label": f"EasyEdit result file ({p.name}, N={len(data)})", "kind": "measured", "run_dir": str(p),
            "alg": "?", "model": "not recorded", "n": len(data), "metrics": _rows_stats(per_case, {}),
            "case_ids": [m.get("case_id", i) for i, m in enumerate(data)],
            "protocol": {"metric_families": EASYEDIT_FAMILY, "comparable_groups": groups}}


def expand_paths(paths: list[str]) -> list[str]:
    """A folder of runs (``results/<ALG>/`` with ``run_<NNN>`` folders, as ROME's and MEMIT's
    summarize take ``--dir_name``) stands for its runs; anything else is kept as given."""
    out: list[str] = []
    for p in paths:
        d = Path(p)
        runs = sorted(r for r in d.glob("run_*") if r.is_dir()) if d.is_dir() else []
        if runs and not (d / "params.json").is_file() and not any(_named_case_files(d)):
            out.extend(str(r) for r in runs)
        else:
            out.append(p)
    return out


def case_ids_any(path: str | Path) -> set[str]:
    """The finished record ids of any readable result (for ``--common``)."""
    kind = kind_of(path)
    if kind == "ours":
        return {str(c["case_id"]) for c in read_cases(path)}
    if kind in _FORMAT_LABEL:
        return {str(c["case_id"]) for c in _rome_cases(Path(path), kind)}
    return {str(c) for c in summarize_easyedit_file(path)["case_ids"]}


def summarize_any(path: str | Path, *, case_ids: set[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """The summary row of our run dir, a ROME or MEMIT run folder or an EasyEdit result file
    (which of them is read from the contents, see :func:`kind_of`)."""
    kind = kind_of(path)
    if kind == "ours":
        try:
            return summarize_run(path, case_ids=case_ids, limit=limit)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ShiftEditError(f"{path}: malformed run folder (a case or params.json lacks {exc})") from None
    if kind in _FORMAT_LABEL:
        return summarize_rome_dir(path, case_ids=case_ids, limit=limit, fmt=kind)
    return summarize_easyedit_file(path, case_ids=case_ids, limit=limit)
