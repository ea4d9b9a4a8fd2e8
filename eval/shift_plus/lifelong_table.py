"""One markdown row per checkpoint of sequential (lifelong) runs: strict top-1 held, ROME ES / RS / NS (unedited NS),
WikiText perplexity (unedited), refused edits.

    python eval/shift_plus/lifelong_table.py NAME=RUN_DIR [NAME=RUN_DIR ...]

RUN_DIR holds ``checkpoints/ckpt_<n>.json`` (a ``shift-edit bench --sequential`` run's ``seq_000`` folder, or a copy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def refused(value) -> int:
    """Refused edits so far (a count, or a list of them in older files)."""
    return len(value) if isinstance(value, list) else int(value or 0)


def rows(name: str, run: Path) -> list[str]:
    out = []
    ckpts = sorted(run.glob("checkpoints/ckpt_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    for path in ckpts:
        c = json.loads(path.read_text())
        m, u = c["metrics"], c.get("unedited_metrics", {})

        def f(key: str, src: dict) -> str:
            return f"{src[key]['mean']:.1f}" if key in src else "-"

        out.append(f"| {name} | {c['checkpoint']} | {f('efficacy_top1', m)} | {f('ES', m)} / {f('RS', m)} / "
                   f"{f('NS', m)} "
                   f"({f('NS', u)}) | {c['wikitext_ppl']:.2f} ({c['unedited_wikitext_ppl']:.2f}) | "
                   f"{refused(c.get('refused_edits'))} |")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print("| run | edits | strict top-1 held | ES / RS / NS (NS unedited) | ppl (unedited) | refused |")
    print("|---|---|---|---|---|---|")
    for spec in args:
        name, _, path = spec.partition("=")
        print("\n".join(rows(name, Path(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
