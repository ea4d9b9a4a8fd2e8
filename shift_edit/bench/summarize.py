"""Summaries of run directories: mean, std and 95% CI per metric; markdown, CSV, JSON, PNG.

Percent-scaled metrics (success rates, accuracies, magnitudes, n-gram entropy) are x100 as in
ROME's and MEMIT's tables; NLLs, KL and perplexity are raw. The 95% CI is the normal
approximation ``mean +- 1.96 * std / sqrt(n)`` (std with ddof=1). ROME's score S is the
harmonic mean of the mean ES, PS and NS (it has no per-record std).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ShiftEditError
from ..core.registry import run_tag
from .fact_columns import COLUMNS as FACT_COLUMNS
from .fact_columns import EE_COLUMNS
from .run_dirs import run_selection

#: (column name, path in a case's "metrics", scale)
METRICS: list[tuple[str, tuple[str, ...], float]] = [
    ("ES", ("rome", "rewrite_success"), 100.0),
    ("PS", ("rome", "paraphrase_success"), 100.0),
    ("NS", ("rome", "neighborhood_success"), 100.0),
    ("RS", ("rome", "rephrase_success"), 100.0),
    ("EM", ("rome", "rewrite_magnitude"), 100.0),
    ("PM", ("rome", "paraphrase_magnitude"), 100.0),
    ("NM", ("rome", "neighborhood_magnitude"), 100.0),
    ("efficacy_top1", ("top1", "rewrite_acc"), 100.0),
    ("paraphrase_top1", ("top1", "paraphrase_acc"), 100.0),
    ("rephrase_top1", ("top1", "rephrase_acc"), 100.0),
    ("neighborhood_top1", ("top1", "neighborhood_acc"), 100.0),
    ("efficacy_top1_first_token", ("top1_first", "rewrite_acc"), 100.0),
    ("paraphrase_top1_first_token", ("top1_first", "paraphrase_acc"), 100.0),
    ("neighborhood_top1_first_token", ("top1_first", "neighborhood_acc"), 100.0),
    # WILD-style free generation (bench/wild.py): the wanted object said before the competing one
    ("gen_efficacy", ("wild", "rewrite_success"), 100.0),
    ("gen_paraphrase", ("wild", "paraphrase_success"), 100.0),
    ("gen_rephrase", ("wild", "rephrase_success"), 100.0),
    ("gen_neighborhood", ("wild", "neighborhood_success"), 100.0),
    ("neighborhood_kl", ("neighborhood_kl", "mean"), 1.0),
    ("ngram_entropy", ("generation", "ngram_entropy"), 100.0),
    ("wikitext_ppl", ("perplexity", "value"), 1.0),
    # EasyEdit token accuracy, only in rows read from EasyEdit result files (bench/foreign.py)
    ("ee_rewrite_acc", ("easyedit", "rewrite_acc"), 100.0),
    ("ee_rephrase_acc", ("easyedit", "rephrase_acc"), 100.0),
    ("ee_locality", ("easyedit", "locality"), 100.0),
    ("ee_portability", ("easyedit", "portability"), 100.0),
    ("ee_fluency", ("easyedit", "fluency"), 100.0),
    # zsRE (MEMIT's token accuracy, zsre_token_acc; strict whole answer, zsre_top1) and KnowEdit's per-sub-key
    # EasyEdit columns: in runs of `bench --data zsre|knowedit-*` (bench/fact_metrics.py)
    *[(name, path, 100.0) for name, path in FACT_COLUMNS + EE_COLUMNS],
    # CounterFact records with EasyEdit's portability question (bench --portability)
    ("cf_portability", ("easyedit_portability", "acc"), 100.0),
]


def _get(d: dict, path: Sequence[str]) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) else None


def stats(values: Sequence[float]) -> dict[str, float]:
    """n, mean, std (ddof=1) and the 95% CI half-width (normal approximation)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(n)}


def read_cases(run_dir: str | Path) -> list[dict[str, Any]]:
    """The finished case records of a run dir, in their run order (``position``)."""
    cases = []
    for p in run_selection(Path(run_dir)):
        try:
            case = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise ShiftEditError(f"{p}: unreadable case file") from None
        if not isinstance(case, dict) or not isinstance(case.get("metrics"), dict) or "case_id" not in case:
            theirs = isinstance(case, dict) and isinstance(case.get("post"), dict)
            raise ShiftEditError(f"{p}: " + ("a ROME/MEMIT case file (case_id, post) in a shift_edit run folder: keep "
                                             "each format in a folder of its own" if theirs
                                             else "not a shift_edit case file (no case_id and metrics)"))
        cases.append(case)
    return sorted(cases, key=lambda c: (c.get("position", 0), str(c["case_id"])))


def summarize_run(run_dir: str | Path, *, case_ids: set[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """Per-metric statistics of one run dir, with its label (alg, model, N).

    Args:
        case_ids: only these records (``str(case_id)``), e.g. the ones every compared run has.
        limit: only the first ``limit`` records in run order (after ``case_ids``).
    """
    run_dir = Path(run_dir)
    try:
        params = json.loads((run_dir / "params.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise ShiftEditError(f"{run_dir} is not a run directory (no readable params.json)") from None
    cases = read_cases(run_dir)
    if case_ids is not None:
        cases = [c for c in cases if str(c["case_id"]) in case_ids]
    if limit is not None:
        cases = cases[:limit]
    if not cases:
        raise ShiftEditError(f"{run_dir} has no finished cases" + (" in the selection" if case_ids or limit else ""))
    out: dict[str, Any] = {}
    for name, path, scale in METRICS:
        vals = [v * scale for v in (_get(c["metrics"], path) for c in cases) if v is not None]
        if vals:
            out[name] = stats(vals)
    times = sorted(c["time_s"]["edit"] for c in cases if c.get("edit", {}).get("applied") and "time_s" in c)
    if times:  # wall time of edit() alone (batched runs: the whole batch's edit), median over edited records
        out["edit_time_median_s"] = {"n": len(times), "mean": _median(times), "std": None, "ci95": None}
    es, ps, ns = (out.get(k, {}).get("mean") for k in ("ES", "PS", "NS"))
    if es is not None and ps is not None and ns is not None:
        out["S"] = {"n": len(cases), "mean": harmonic_mean([es, ps, ns]), "std": None, "ci95": None}
    match = params["match"]
    refused = sum(1 for c in cases if c.get("edit", {}).get("refused"))
    label = (f"measured here ({match['alg']}{run_tag(match['alg'], match.get('hparams'))}, {match['model']['name']}, "
             f"N={len(cases)}"
             + (f", {refused} refused by the edit guard and scored unedited" if refused else "") + ")")
    return {"label": label, "kind": "measured", "run_dir": str(run_dir), "alg": match["alg"],
            "dataset": dataset_of(match),
            "model": match["model"]["name"], "n": len(cases), "metrics": out,
            "case_ids": [c["case_id"] for c in cases],
            # what the numbers mean: protocol (metric families), model + fingerprint, hparams, seed, data, versions
            "protocol": match, "data": params.get("data"), "provenance": params.get("provenance")}


def dataset_of(match: dict[str, Any]) -> str:
    """The data set a run's match key names (runs before zsRE/KnowEdit existed: ``counterfact``)."""
    protocol = match.get("protocol") if isinstance(match, dict) else None
    return str(protocol.get("dataset", "counterfact")) if isinstance(protocol, dict) else "counterfact"


def by_dataset(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by data set (first-seen order): one table each, never a zsRE and a CounterFact row in one."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("dataset", "counterfact"), []).append(r)
    return out


def to_markdown_by_dataset(rows: Sequence[dict]) -> str:
    """:func:`to_markdown` per data set, each under a ``## <data set>`` heading (one data set: no heading)."""
    groups = by_dataset(rows)
    if len(groups) <= 1:
        return to_markdown(rows)
    return "\n".join(f"## {name}\n\n{to_markdown(rs)}" for name, rs in groups.items())


def _median(xs: Sequence[float]) -> float:
    n = len(xs)
    return float(xs[n // 2]) if n % 2 else float((xs[n // 2 - 1] + xs[n // 2]) / 2)


def harmonic_mean(xs: Sequence[float]) -> float:
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def load_reference(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a published-reference JSON (``eval/reference/*.json``), labelled as published."""
    try:
        ref = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShiftEditError(f"cannot read reference file {path}: {exc}") from None
    rows = []
    seq = ref.get("sequential")  # lifelong-editing tables: rows labelled with T and B
    for r in ref["rows"]:
        model = r.get("model", ref["model"])
        size = f"T={seq['T']}, B={seq['B']}" if seq else (f"N={ref['n']}" if ref.get("n") else "N not stated")
        size += f", {ref['setting']}" if ref.get("setting") else ""  # single edits / one batch / never undone
        label = f"published ({r['alg']}, {model}, {size}; {ref['source']})"
        metrics = {k: {"n": ref.get("n"), "mean": v, "std": None, "ci95": None} for k, v in r["metrics"].items()}
        rows.append({"label": label, "kind": "published", "alg": r["alg"], "model": model, "n": ref.get("n"),
                     "dataset": ref.get("dataset", "counterfact"),
                     "metrics": metrics, "family": ref.get("metric_family")})
    return rows


def _columns(rows: Sequence[dict]) -> list[str]:
    order = [m[0] for m in METRICS] + ["S", "edit_time_median_s", "edits_per_s"]
    present = {k for r in rows for k in r["metrics"]}
    return [c for c in order if c in present]


def _fmt(m: dict | None) -> str:
    if not m:
        return "-"
    s = f"{m['mean']:.2f}"
    if m.get("std") is not None:
        s += f" ± {m['ci95']:.2f}"
    return s


def to_markdown(rows: Sequence[dict]) -> str:
    """A markdown table (runs as rows; cells are mean ± 95% CI half-width)."""
    cols = _columns(rows)
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(r["metrics"].get(c)) for c in cols) + " |")
    lines.append("")
    lines.append("Families: ES/PS/NS/RS (success) and EM/PM/NM (magnitude) = ROME probability comparisons from mean "
                 "token NLLs; *_top1 = strict top-1 accuracy (all target tokens argmax; neighborhood = TRUE object); "
                 "*_first_token = first-token-only top-1; RS/rephrase = EasyEdit rephrase_prompt (not ROME "
                 "paraphrases); "
                 "S = harmonic mean of ES, PS, NS; ee_* = EasyEdit token accuracy (post-edit, from EasyEdit result "
                 "files; "
                 "fluency = n-gram entropy); edit_time_median_s = median wall time of edit() over edited records; "
                 "cells: mean ± 95% CI (normal approx.), x100 except KL, ppl and time.")
    if any(c.startswith("zsre_") for c in cols):
        lines[-1] += (" zsre_* (family zsre_token_acc) = MEMIT's zsRE token-level top-1 accuracy of the answer under "
                      "teacher forcing: efficacy (src), generalization (rephrase), specificity (NQ question vs its "
                      "gold "
                      "answer); zsre_*_top1 (family zsre_top1) = the whole answer top-1.")
    if any(c.startswith("ee_portability_") or c.startswith("ee_locality_") for c in cols):
        lines[-1] += (" ee_portability_<key> / ee_locality_<key> = EasyEdit token accuracy per KnowEdit sub-key "
                      "(locality: agreement with the unedited model's argmax tokens); ee_rewrite_acc = KnowEdit's "
                      "Edit Succ.")
    if any(c.startswith("gen_") for c in cols):  # (a sentence only where the family is shown: older tables unchanged)
        lines[-1] += (" gen_* = WILD-style free generation: the greedy continuation of the prompt says the new object "
                      "before the true one (gen_neighborhood: the true object before the new one).")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "kind", "alg", "model", "n", "metric", "mean", "std", "ci95"])
    for r in rows:
        for c in _columns([r]):
            m = r["metrics"][c]
            w.writerow([r["label"], r["kind"], r["alg"], r["model"], r["n"], c, m["mean"], m["std"], m["ci95"]])
    return buf.getvalue()


def legend_labels(rows: Sequence[dict], width: int = 70) -> list[str]:
    """Chart legend entries: a published row by its method and model (its full label, which names the source and
    setting, stays in the tables), or by its full label when two rows share both; a measured row's label longer than
    `width` is cut with an ellipsis."""
    published = Counter((r["alg"], r["model"]) for r in rows if r["kind"] == "published")
    out = []
    for r in rows:
        if r["kind"] == "published":
            out.append(f"published ({r['alg']}, {r['model']})" if published[r["alg"], r["model"]] == 1 else r["label"])
        else:
            out.append(r["label"] if len(r["label"]) <= width else r["label"][: width - 1] + "\u2026")
    return out


def bar_chart(rows: Sequence[dict], path: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """A grouped bar chart of percentage metrics, one group per metric, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default = ["ES", "PS", "NS", "efficacy_top1", "paraphrase_top1", "neighborhood_top1", "gen_efficacy",
               "gen_paraphrase",
               # zsRE / KnowEdit runs (absent from CounterFact rows, so not drawn there)
               "zsre_efficacy", "zsre_generalization", "zsre_specificity", "ee_rewrite_acc", "ee_rephrase_acc",
               "ee_portability", "ee_locality"]
    cols = [c for c in (metrics or default) if any(c in r["metrics"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, len(cols) * max(1.6, 0.12 * len(rows))), 4 + 0.18 * ((len(rows) + 1) // 2)))
    width = 0.8 / max(1, len(rows))
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors  # tab20: no colour repeats up to 20 bars
    for i, (r, label) in enumerate(zip(rows, legend_labels(rows))):
        xs = [j + i * width for j in range(len(cols))]
        ys = [r["metrics"].get(c, {}).get("mean", float("nan")) for c in cols]
        ci = [r["metrics"].get(c, {}).get("ci95") or 0.0 for c in cols]
        # percentages: the bars of the 95% CI stop at 0 and 100
        err = [[min(e, y) if y == y else 0.0 for e, y in zip(ci, ys)],
               [min(e, 100.0 - y) if y == y else 0.0 for e, y in zip(ci, ys)]]
        ax.bar(xs, ys, width, yerr=err, label=label, color=colors[i % len(colors)],
               hatch="//" if r["kind"] == "published" else None)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(cols))], cols, rotation=20)
    ax.set_ylabel("%")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.26), ncol=2,
              frameon=False)  # below: no bar hidden
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the legend below the axes is kept whole
    plt.close(fig)
    return path
