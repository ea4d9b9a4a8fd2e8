"""Summaries and curves of sequential (lifelong) runs: table rows labelled with T and B, retention,
neighborhood and perplexity curves against the number of edits (PNG + CSV + JSON)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ShiftEditError
from ..core.registry import run_tag
from .plots import plot_ppl
from .summarize import dataset_of

#: curve columns: (column, where in a checkpoint, metric name)
CURVE_METRICS = ("efficacy_top1", "ES", "paraphrase_top1", "PS", "rephrase_top1", "RS", "neighborhood_top1", "NS",
                 "gen_efficacy", "gen_paraphrase", "gen_rephrase", "gen_neighborhood",
                 # zsRE (zsre_token_acc) and KnowEdit (easyedit) runs
                 "zsre_efficacy", "zsre_generalization", "zsre_specificity", "zsre_efficacy_top1",
                 "ee_rewrite_acc", "ee_rephrase_acc", "ee_portability", "ee_locality")


def is_sequential(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a sequential run (its params name a ``sequential`` protocol)."""
    try:
        params = json.loads((Path(run_dir) / "params.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    match = params.get("match") if isinstance(params, dict) else None  # ROME's/MEMIT's params.json: their hparams
    return isinstance(match, dict) and isinstance(match.get("protocol"), dict) and "sequential" in match["protocol"]


def _load(run_dir: Path) -> tuple[dict, dict]:
    try:
        params = json.loads((run_dir / "params.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise ShiftEditError(f"{run_dir}: no readable summary.json (has a checkpoint been measured yet?)") from None
    if not summary.get("checkpoints"):
        raise ShiftEditError(f"{run_dir}: no checkpoint measured yet")
    return params, summary


def summarize_sequential(run_dir: str | Path) -> list[dict[str, Any]]:
    """Two table rows of a sequential run at its last measured checkpoint: the edited model, and the
    unedited model on the same records. Labels carry T (edits made) and B."""
    run_dir = Path(run_dir)
    params, summary = _load(run_dir)
    match = params["match"]
    last = max(summary["checkpoints"], key=lambda c: c["n_edits"])
    n, b, t_plan = last["n_edits"], summary["B"], summary["T"]
    model = match["model"]["name"]
    plan = "" if n == t_plan else f" of {t_plan} planned"
    metrics = dict(last["metrics"])
    if last.get("wikitext_ppl") is not None:
        metrics["wikitext_ppl"] = {"n": 1, "mean": last["wikitext_ppl"], "std": None, "ci95": None}
    if last["speed"].get("edits_per_s"):
        metrics["edits_per_s"] = {"n": n, "mean": last["speed"]["edits_per_s"], "std": None, "ci95": None}
    base = dict(last["unedited_metrics"])
    if last.get("unedited_wikitext_ppl") is not None:
        base["wikitext_ppl"] = {"n": 1, "mean": last["unedited_wikitext_ppl"], "std": None, "ci95": None}
    common = {"model": model, "n": n, "dataset": dataset_of(match), "run_dir": str(run_dir), "protocol": match,
              "data": params.get("data"),
              "provenance": params.get("provenance"), "sequential": {"T": n, "B": b, "T_planned": t_plan}}
    return [
        {"label": f"measured here ({match['alg']}{run_tag(match['alg'], match.get('hparams'))}, {model}, sequential "
         f"T={n}{plan}, B={b})",
         "kind": "measured", "alg": match["alg"], "metrics": metrics, **common},
        {"label": f"unedited ({model}, the same {n} records)", "kind": "measured", "alg": "NONE", "metrics": base,
         **common},
    ]


def run_names(runs: Sequence[tuple[str, int, str, str]]) -> list[str]:
    """Curve names for runs given as ``(alg, B, T label, hparams tag)``: ``"ALG B=b"``, and where two runs
    would share that name, ``"ALG<tag> T=<label> B=b"``, and where even those coincide, `` (k)`` by order (so no two
    runs are drawn as one line)."""
    short = [f"{alg} B={b}" for alg, b, _, _ in runs]
    names = [s if short.count(s) == 1 else f"{alg}{tag} T={t} B={b}" for s, (alg, b, t, tag) in zip(short, runs)]
    return [n if names.count(n) == 1 else f"{n} ({names[:i + 1].count(n)})" for i, n in enumerate(names)]


def _t_label(summary: dict) -> str:
    """``"1000"``, or ``"5 of 1000"`` for a run stopped before its planned T."""
    reached = max((c["n_edits"] for c in summary["checkpoints"]), default=0)
    return str(summary["T"]) if reached >= summary["T"] else f"{reached} of {summary['T']}"


def curves(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per (run, checkpoint): n_edits, the metrics' means (edited and unedited), perplexity,
    speed, memory and the largest relative change of an edited matrix."""
    loaded = [_load(Path(d)) for d in run_dirs]
    names = run_names([(p["match"]["alg"], s["B"], _t_label(s), run_tag(p["match"]["alg"], p["match"].get("hparams")))
                       for p, s in loaded])
    rows = []
    for (params, summary), run in zip(loaded, names):
        alg = params["match"]["alg"]
        for c in sorted(summary["checkpoints"], key=lambda c: c["n_edits"]):
            row: dict[str, Any] = {"run": run, "alg": alg, "B": summary["B"], "n_edits": c["n_edits"]}
            for m in CURVE_METRICS:
                if m in c["metrics"]:
                    row[m] = c["metrics"][m]["mean"]
                    row[f"unedited_{m}"] = c["unedited_metrics"].get(m, {}).get("mean")
            row["wikitext_ppl"] = c.get("wikitext_ppl")
            row["unedited_wikitext_ppl"] = c.get("unedited_wikitext_ppl")
            row["edits_per_s"] = c["speed"].get("edits_per_s")
            row["edit_s_total"] = c["speed"].get("edit_s_total")
            row["eval_s_per_record"] = c["speed"].get("eval_s_per_record")
            if c["speed"].get("wild_s_per_record") is not None:  # free generation (gen_*), when measured
                row["wild_s_per_record"] = c["speed"]["wild_s_per_record"]
            row["peak_rss_mb"] = c["memory"].get("peak_rss_mb")
            norms = c.get("norms") or {}
            row["max_rel_delta_fro"] = max((v["delta_fro"] / v["base_fro"] for v in norms.values()), default=None)
            row["max_delta_spectral"] = max((v["delta_spectral"] for v in norms.values()), default=None)
            row["dataset"] = dataset_of(params["match"])  # (last: the CSV's earlier columns keep their order)
            rows.append(row)
    return rows


def curves_csv(rows: Sequence[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


# length: four matplotlib figures drawn from the same rows, one block per figure
def plot_curves(rows: Sequence[dict], out: str | Path) -> list[Path]:
    """retention.png (edits that still hold vs edits made, log x), neighborhood.png, paraphrase.png (when the runs
    scored paraphrase prompts), perplexity.png and, when the runs measured the WILD-style family, generation.png
    (free-generation success, dashed: unedited)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    paths = []
    cf = any(r.get("dataset", "counterfact") == "counterfact" for r in rows)  # zsRE/KnowEdit-only: no empty panels
    panels = (
        [
            (
                "retention.png",
                [("efficacy_top1", "strict top-1 efficacy"), ("ES", "ROME ES")],
                "share of all edits made so far that hold (%)",
            ),
            (
                "neighborhood.png",
                [("neighborhood_top1", "strict top-1 neighborhood (TRUE object)"), ("NS", "ROME NS")],
                "neighborhood (%), dashed: unedited on the same records",
            ),
        ]
        if cf
        else []
    )
    if any(r.get("paraphrase_top1") is not None for r in rows):
        panels.append(("paraphrase.png", [("paraphrase_top1", "strict top-1 paraphrase"), ("PS", "ROME PS")],
                       "paraphrases (%), dashed: unedited on the same records"))
    if cf or any(r.get("wikitext_ppl") is not None for r in rows):
        panels.append(("perplexity.png", [("wikitext_ppl", "WikiText perplexity")], "perplexity, dashed: unedited"))
    if any(r.get("zsre_efficacy") is not None for r in rows):
        panels.append(("retention_zsre.png", [("zsre_efficacy", "zsRE efficacy (token acc.)"),
                                              ("zsre_specificity", "zsRE specificity (token acc.)")],
                       "zsre_token_acc (%), specificity dashed: unedited"))
    if any(r.get("ee_rewrite_acc") is not None for r in rows):
        panels.append(("retention_knowedit.png", [("ee_rewrite_acc", "KnowEdit Edit Succ."),
                                                  ("ee_locality", "KnowEdit locality")],
                       "easyedit (%), locality dashed: unedited"))
    if any(r.get("gen_efficacy") is not None for r in rows):
        panels.append(("generation.png", [("gen_efficacy", "WILD-style generation, rewrite prompt"),
                                          ("gen_paraphrase", "WILD-style generation, paraphrases")],
                       "new object said before the true one (%), dashed: unedited"))
    for name, metrics, ylabel in panels:
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
        for ax, (m, title) in zip(axes[0], metrics):
            for i, (run, rs) in enumerate(sorted(runs.items())):
                pts = [(r["n_edits"], r.get(m)) for r in rs if r.get(m) is not None]
                if not pts:
                    continue
                color = plt.get_cmap("tab20")((2 * i) % 20 + (i // 10) % 2)  # 10 hues, then their light shades
                base = [(r["n_edits"], r.get(f"unedited_{m}")) for r in rs if r.get(f"unedited_{m}") is not None]
                if m == "wikitext_ppl":  # a collapsed model's inf / 1e32 drawn at 100x unedited as a labelled ▲
                    plot_ppl(ax, *zip(*pts), run, base[0][1] if base else None, color=color, ms=6)
                else:
                    ax.plot(*zip(*pts), marker="o", color=color, label=run)
                if base and name != "retention.png":
                    ax.plot(*zip(*base), linestyle="--", color=color, alpha=0.6)
            ax.set_xscale("log")
            ax.set_xlabel("edits made (log)")
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            if m == "wikitext_ppl":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
