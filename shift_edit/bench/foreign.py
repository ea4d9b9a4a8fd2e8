"""Summaries of result folders written by other toolkits, as rows of ``shift-edit summarize``.

- A ROME/MEMIT run folder (``case_<id>.json`` or ``<n>_edits-case_<id>.json`` files with
  ``post.*_prompts_probs``): ES/PS/NS and EM/PM/NM computed as ROME's and MEMIT's
  ``experiments/summarize.py`` do (success = ``target_true > target_new`` NLL, neighborhood the
  reverse; magnitude = difference of ``exp(-NLL)``), strict top-1 from MEMIT's
  ``*_prompts_correct``, ``ngram_entropy``; S = harmonic mean of the mean ES, PS, NS.
- An EasyEdit result JSON (the ``metrics`` list EasyEdit returns, dumped to a file): the post-edit
  means of ``rewrite_acc``, ``rephrase_acc``, each ``locality``/``portability`` key and fluency,
  as EasyEdit token accuracy (its own family; not comparable to the above).

Anything else is one :class:`ShiftEditError` line naming the path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ShiftEditError
from .summarize import harmonic_mean, read_cases, stats, summarize_run

ROME_FAMILY = "read from ROME/MEMIT case files: ES/PS/NS from post.*_prompts_probs (mean token NLLs), top-1 from *_prompts_correct"
EASYEDIT_FAMILY = "EasyEdit token accuracy (post.rewrite_acc etc. of an EasyEdit metrics list)"


def _load(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ShiftEditError(f"{p}: unreadable or not JSON") from None


def _case_files(d: Path) -> list[Path]:
    return sorted((p for p in d.glob("*case_*.json") if not p.name.startswith(".")), key=lambda p: p.name)


def kind_of(path: str | Path) -> str:
    """``"ours"``, ``"rome"`` (ROME/MEMIT run folder) or ``"easyedit"`` (result JSON file)."""
    p = Path(path)
    if p.is_file():
        return "easyedit"
    if not p.is_dir():
        raise ShiftEditError(f"{p}: no such run folder or result file")
    if (p / "params.json").is_file():
        return "ours"
    files = _case_files(p)
    if files:
        first = _load(files[0])
        if isinstance(first, dict) and "post" in first and "case_id" in first:
            return "rome"
        raise ShiftEditError(f"{files[0]}: not a ROME/MEMIT case file (no case_id and post)")
    raise ShiftEditError(f"{p}: not a run folder (no params.json, no ROME/MEMIT case_*.json files)")


def _rome_cases(d: Path) -> list[dict[str, Any]]:
    cases = []
    for f in _case_files(d):
        c = _load(f)
        if not isinstance(c, dict) or "case_id" not in c or not isinstance(c.get("post"), dict):
            raise ShiftEditError(f"{f}: not a ROME/MEMIT case file (no case_id and post)")
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
        raise ShiftEditError(f"{where}: malformed post metrics (expected lists of {{target_new, target_true}})") from None
    return out


def _rows_stats(per_case: list[dict[str, float]], scale: dict[str, float]) -> dict[str, Any]:
    cols = sorted({k for c in per_case for k in c})
    return {k: stats([c[k] * scale.get(k, 100.0) for c in per_case if k in c]) for k in cols}


def summarize_rome_dir(d: str | Path, *, case_ids: set[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """A summary row of a ROME/MEMIT run folder (post-edit numbers)."""
    d = Path(d)
    cases = _rome_cases(d)
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
    alg = d.parent.name or "?"
    return {"label": f"ROME/MEMIT-format folder ({alg}/{d.name}, N={len(cases)})", "kind": "measured", "run_dir": str(d),
            "alg": alg, "model": "not recorded", "n": len(cases), "metrics": metrics,
            "case_ids": [c["case_id"] for c in cases], "protocol": {"metric_families": ROME_FAMILY}}


def summarize_easyedit_file(p: str | Path, *, case_ids: set[str] | None = None, limit: int | None = None) -> dict[str, Any]:
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
                accs = [_mean([float(x) for x in v]) for k, v in (post.get(section) or {}).items() if k.endswith("_acc") and v]
                if accs:
                    row[f"ee_{section}"] = _mean(accs)
            if isinstance(post.get("fluency"), dict) and "ngram_entropy" in post["fluency"]:
                row["ee_fluency"] = float(post["fluency"]["ngram_entropy"])
            per_case.append(row)
    except (TypeError, ValueError):
        raise ShiftEditError(f"{p}: malformed EasyEdit metrics (accuracies must be numbers or lists of numbers)") from None
    groups = sorted({meta.get("comparable_group", "?") for m in data
                     for meta in (m["post"].get("metric_meta") or {}).values() if isinstance(meta, dict)})
    return {"label": f"EasyEdit result file ({p.name}, N={len(data)})", "kind": "measured", "run_dir": str(p),
            "alg": "?", "model": "not recorded", "n": len(data), "metrics": _rows_stats(per_case, {}),
            "case_ids": [m.get("case_id", i) for i, m in enumerate(data)],
            "protocol": {"metric_families": EASYEDIT_FAMILY, "comparable_groups": groups}}


def expand_paths(paths: list[str]) -> list[str]:
    """A folder of runs (ROME's ``results/<ALG>/`` with ``run_<NNN>`` folders, as ROME's summarize
    takes ``--dir_name``) stands for its runs; anything else is kept as given."""
    out: list[str] = []
    for p in paths:
        d = Path(p)
        runs = sorted(r for r in d.glob("run_*") if r.is_dir()) if d.is_dir() else []
        if runs and not (d / "params.json").is_file() and not _case_files(d):
            out.extend(str(r) for r in runs)
        else:
            out.append(p)
    return out


def case_ids_any(path: str | Path) -> set[str]:
    """The finished record ids of any readable result (for ``--common``)."""
    kind = kind_of(path)
    if kind == "ours":
        return {str(c["case_id"]) for c in read_cases(path)}
    if kind == "rome":
        return {str(c["case_id"]) for c in _rome_cases(Path(path))}
    return {str(c) for c in summarize_easyedit_file(path)["case_ids"]}


def summarize_any(path: str | Path, *, case_ids: set[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """The summary row of our run dir, a ROME/MEMIT run folder or an EasyEdit result file."""
    kind = kind_of(path)
    if kind == "ours":
        try:
            return summarize_run(path, case_ids=case_ids, limit=limit)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ShiftEditError(f"{path}: malformed run folder (a case or params.json lacks {exc})") from None
    if kind == "rome":
        return summarize_rome_dir(path, case_ids=case_ids, limit=limit)
    return summarize_easyedit_file(path, case_ids=case_ids, limit=limit)
