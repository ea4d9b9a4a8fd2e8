"""Ablation table (markdown) and frontier plot (efficacy vs NS) from the SHIFT_PLUS sweep files.

    python eval/shift_plus/report.py eval/reports/shift_plus/sweep20.jsonl ... \\
        --table eval/reports/shift_plus/ablation.md --plot eval/reports/shift_plus/frontier.png \\
        --shift-sweep eval/reports/shift_hparams_smollm2/summary.json

Rows tagged with a ``curve`` (``sweep.py --curve``) are drawn as one line each; ``--shift-sweep`` adds
SHIFT's push (eta) sweep at one layer from a ``shift-edit summarize`` file, one line.

Reference points (ROME, SHIFT, unedited) are the 300-record numbers measured in this repository
(README, "ROME and MEMIT beside the shift"; SHIFT_PLUS from `bench300/`, SHIFT_NEURON from `bench300_shift_neuron/`): a
different record count from the sweep rows, drawn
hollow and labelled so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: measured here, SmolLM2-135M, first 300 records (README table; one SHIFT_PLUS point: 100): strict top-1 efficacy,
#: ROME NS
REFERENCE_300 = {"ROME, layer 5 (N=300)": (99.0, 70.2), "SHIFT, layer 26, push 60 (N=300)": (68.0, 36.1),
                 "MEMIT, layers 2-6 (N=300)": (90.0, 73.3), "unedited (N=300)": (0.7, 74.5),
                 "SHIFT_PLUS, shipped (N=300)": (95.0, 55.1),
                 "SHIFT_PLUS, lifelong hparams (N=100)": (98.0,
                                                          60.2),  # eval/reports/shift_plus/lifelong_single100.jsonl
                 "SHIFT_NEURON, shipped (N=300)": (98.3, 71.7)}  # eval/reports/shift_plus/bench300_shift_neuron/

COLUMNS = [("efficacy_top1", "eff"), ("paraphrase_top1", "para"), ("neighborhood_top1", "nbr"),
           ("ES", "ES"), ("PS", "PS"), ("NS", "NS"), ("S", "S"), ("neighborhood_kl", "KL"),
           ("ppl_ratio_median", "ppl x"), ("forward_passes_mean", "passes"), ("edit_time_ratio", "time / fwd")]


def read(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    return rows


def table(rows: list[dict]) -> str:
    head = "| variant | N | " + " | ".join(c for _, c in COLUMNS) + " |"
    out = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = []
        for k, _ in COLUMNS:
            v = r.get(k)
            cells.append(
                "" if v is None else (f"{v:.3f}" if k in ("ppl_ratio_median", "neighborhood_kl") else f"{v:.1f}")
            )
        out.append(f"| {r['name']} `{json.dumps(r['override'])}` | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def shift_sweep(path: str, layer: int) -> list[dict]:
    """(NS, efficacy) points of SHIFT at ``layer`` from a ``shift-edit summarize`` JSON file, by push."""
    pts = []
    for r in json.loads(Path(path).read_text())["rows"]:
        if r.get("alg") == "SHIFT" and f"SHIFT L{layer} eta" in r["label"]:
            m = r["metrics"]
            pts.append({"NS": m["NS"]["mean"], "efficacy_top1": m["efficacy_top1"]["mean"],
                        "eta": r["label"].split(" eta ")[1].split()[0], "n": m["NS"]["n"]})
    return pts


def plot(rows: list[dict], path: str, sweeps: dict[str, list[dict]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    points = [r for r in rows if not r.get("curve")]
    for i, r in enumerate(points):  # labels staggered below the points: the rows share an efficacy
        ax.scatter(r["NS"], r["efficacy_top1"], color="tab:blue")
        ax.annotate(r["name"], (r["NS"], r["efficacy_top1"]), xytext=(0, -12 - 9 * i), textcoords="offset points",
                    fontsize=6, arrowprops={"arrowstyle": "-", "lw": 0.3})
    curves: dict[str, list[dict]] = dict(sweeps or {})
    for r in rows:
        if r.get("curve"):
            curves.setdefault(r["curve"], []).append(r)
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda r: r["NS"])
        ax.plot([p["NS"] for p in pts], [p["efficacy_top1"] for p in pts], "o-", ms=3, label=name)
        for p in pts:
            tag = p.get("eta") or (p.get("override") or {}).get("margin")
            if tag is not None:
                ax.annotate(str(tag), (p["NS"], p["efficacy_top1"]), xytext=(3, 3), textcoords="offset points",
                            fontsize=6)
    for name, (eff, ns) in REFERENCE_300.items():
        ax.scatter(ns, eff, facecolors="none", edgecolors="tab:red")
        # the two SHIFT_PLUS points sit close to each other and to ROME's: their labels go left-above / right-below
        offset, ha = {
            "lifelong": ((-6, 4), "right"),
            "shipped": ((0, -14), "center"),
            "NEURON": ((-2, -30), "right"),
        }.get(next((k for k in ("NEURON", "lifelong", "shipped") if k in name), ""), ((2, 2), "left"))
        ax.annotate(name, (ns, eff), fontsize=7, color="tab:red", xytext=offset, textcoords="offset points", ha=ha)
    ax.set_xlabel("neighborhood success NS (ROME family), %")
    ax.set_ylabel("efficacy, strict top-1 (MEMIT family), %")
    ax.set_title("SmolLM2-135M: efficacy vs locality\nblue: SHIFT_PLUS sweep rows (N=20); lines: push / margin "
                 "sweeps, labelled by eta / margin; red: 300-record runs")
    ax.title.set_fontsize(8)
    if curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--table", required=True)
    ap.add_argument("--plot", required=True)
    ap.add_argument("--shift-sweep", default=None, help="shift-edit summarize JSON with SHIFT eta sweep rows")
    ap.add_argument("--shift-layer", type=int, default=26, help="the SHIFT layer whose eta sweep is drawn")
    args = ap.parse_args(argv)
    rows = read(args.files)
    Path(args.table).write_text(table(rows) + "\n")
    sweeps = {}
    if args.shift_sweep:
        pts = shift_sweep(args.shift_sweep, args.shift_layer)
        sweeps[f"SHIFT, layer {args.shift_layer}, eta sweep (N={pts[0]['n'] if pts else 0})"] = pts
    plot(rows, args.plot, sweeps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
