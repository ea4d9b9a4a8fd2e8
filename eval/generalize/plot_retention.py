"""One retention figure for the lifelong runs of the generalize report: edit, paraphrase, neighborhood and generation
over the number of edits made, each run against its own unedited reference (dashed).

Reads the ``curves.csv`` that ``shift-edit summarize`` writes for sequential runs; draws four panels (strict top-1
efficacy, strict top-1 paraphrase, ROME-family NS, WILD generation on paraphrases). A run without a column (e.g. no
paraphrase prompts scored, or no WILD family) has no line in that panel.

Usage::

    python eval/generalize/plot_retention.py eval/reports/generalize/lifelong/curves.csv \\
        --out eval/reports/generalize/lifelong/retention_all.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

#: (column, panel title with its metric family)
PANELS = [
    ("efficacy_top1", "edit prompt held (strict top-1)"),
    ("paraphrase_top1", "paraphrases (strict top-1)"),
    ("NS", "neighborhood NS (ROME family)"),
    ("gen_paraphrase", "paraphrases, free generation (WILD)"),
]


def read_curves(path: Path) -> dict[str, list[dict[str, str]]]:
    """Rows of ``curves.csv`` grouped by run, in order of edits made."""
    runs: dict[str, list[dict[str, str]]] = defaultdict(list)
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            runs[row["run"]].append(row)
    return {run: sorted(rows, key=lambda r: float(r["n_edits"])) for run, rows in runs.items()}


def _series(rows: list[dict[str, str]], column: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["n_edits"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
    return [x for x, _ in pts], [y for _, y in pts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curves", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_curves(args.curves)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), sharex=True)
    for ax, (column, title) in zip(axes, PANELS):
        for k, (run, rows) in enumerate(runs.items()):
            color = f"C{k}"
            xs, ys = _series(rows, column)
            if not xs:
                continue
            ax.plot(xs, ys, "o-", color=color, label=run)
            ux, uy = _series(rows, f"unedited_{column}")
            if ux:
                ax.plot(ux, uy, "--", color=color, alpha=0.6)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits made (log)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of all edits made so far (dashed: unedited)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
