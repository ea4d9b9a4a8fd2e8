"""Re-run a few records of the committed reports and compare them, value for value, with the committed files.

Issue 19 asks that a refactor change no result: this script is the evidence. Each case re-runs the first records
of a committed report with its own command (one thread, as the reports were measured), then compares the
per-record values it produced with the committed ones exactly (floats as written, no tolerance). Fields that
describe the run rather than the result (wall time, memory, dates, versions, git commit) are ignored.
Some cases have no committed per-record file that today's code reproduces (the committed minimum-lr rows were
measured by older code); with ``--against DIR`` (the work folder of an earlier run of this script, e.g. on the
commit before a refactor) every JSON and CSV file a case writes is also compared with that run's.

    python eval/reproduce.py                 # all cases, into a temporary folder
    python eval/reproduce.py --out DIR --case seq-shift --case summarize
    python eval/reproduce.py --out after --against before   # before: the same on the older commit

Exit code 0 when every compared value is equal, 1 otherwise. Needs ../shared/data (or $SHIFT_EDIT_DATA).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "eval" / "reports"
VOLATILE = {"speed", "memory", "created", "provenance", "time", "time_s", "edit_s", "seconds", "wall_s", "elapsed_s",
            "updated"}


def _data_dir() -> Path:
    return Path(os.environ.get("SHIFT_EDIT_DATA", ROOT.parent / "shared" / "data"))


def _cli(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SHIFT_EDIT_DATA=str(_data_dir()))
    cmd = [sys.executable, "-m", "shift_edit", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _diff(a: Any, b: Any, where: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                yield f"{where}/{k}: only in {'committed' if k in a else 'rerun'}"
            else:
                yield from _diff(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{where}[{i}]")
    elif a != b and not (a != a and b != b):  # NaN equals NaN here
        yield f"{where}: committed {a!r} != rerun {b!r}"


def _compare(label: str, committed: Any, rerun: Any) -> int:
    problems = list(_diff(_strip(committed), _strip(rerun)))
    n = _count(_strip(committed))
    for p in problems[:10]:
        print(f"  DIFF {label}{p}")
    print(f"  {'same' if not problems else f'{len(problems)} differences'}: {label} ({n} values compared)")
    return len(problems)


def _count(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count(v) for v in value)
    return 1


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _sequential(name: str, alg: str, n: int, batch: int) -> Callable[[Path], int]:
    """The committed run's checkpoint after ``n`` edits, re-run from scratch."""

    def case(work: Path) -> int:
        committed_run = REPORTS / "sequential" / "runs" / name
        hp = json.loads((committed_run / "params.json").read_text())["match"]["hparams"]
        hp_file = work / "hparams.json"
        hp_file.write_text(json.dumps(hp))
        _cli("bench", "--model", "smollm2-135m", "--alg", alg, "--hparams", str(hp_file),
             "--data", str(_data_dir() / "counterfact-easyedit-edit.json"), "--sequential", str(n),
             "--batch-edits", str(batch), "--eval-at", str(n), "--ppl-lines", "3", "--no-progress",
             "--skip-wild", "--out", str(work))  # the committed runs predate the free-generation family
        rerun = json.loads(next(work.glob(f"{alg}/seq_*/checkpoints/ckpt_{n}.json")).read_text())
        committed = json.loads((committed_run / "checkpoints" / f"ckpt_{n}.json").read_text())
        return _compare(f"sequential/runs/{name}/checkpoints/ckpt_{n}.json", committed, rerun)

    return case


def _summarize(work: Path) -> int:
    """``shift-edit summarize`` over the committed sequential runs gives the committed summary files."""
    runs = REPORTS / "sequential" / "runs"
    order = ("SHIFT", "SHIFT-T2000", "FT", "FT-T1000", "MEMIT", "MEMIT-T1000-B100", "AlphaEdit", "AlphaEdit-T50-B10",
             "AlphaEdit-T1000-B100", "ROME-T1000", "SHIFT_PLUS", "SHIFT_PLUS-T1000", "SHIFT_PLUS-lifelong-T1000",
             "SHIFT_NEURON-lifelong-T1000", "SHIFT_NEURON-lifelong-screen-T1000",
             "SHIFT_NEURON-lifelong-try5-T1000", "SHIFT_NEURON-lifelong-x300-T1000",
             "SHIFT_NEURON-lifelong-x400-screen60-21-20-T2000")  # the report's row order
    _cli("summarize", *[str((runs / name).relative_to(ROOT)) for name in order], "--out", str(work),
         "--reference", str(ROOT / "eval" / "reference" / "alphaedit_table1_sequential.json"))
    bad = 0
    for fname in ("summary.json", "curves.json"):
        bad += _compare(f"sequential/{fname}", json.loads((REPORTS / "sequential" / fname).read_text()),
                        json.loads((work / fname).read_text()))
    for fname in ("summary.csv", "curves.csv", "summary.md"):
        same = (REPORTS / "sequential" / fname).read_bytes() == (work / fname).read_bytes()
        print(f"  {'same' if same else 'DIFFERENT'}: sequential/{fname} (bytes)")
        bad += not same
    return bad


def _layer_sweep(work: Path) -> int:
    """The first record of the SHIFT layer sweep, three layers, both eta scalings."""
    _cli("sweep", "--model", "smollm2-135m", "--study", "layer-sweep", "--n-records", "1", "--layers", "0,13,26",
         "--eta-raw", "0.1", "--eta-normalized", "60", "--threads", "1", "--out", str(work))
    committed = _rows(REPORTS / "baselines" / "layer_sweep" / "rows.csv")
    rerun = _rows(work / "rows.csv")
    key = ("case_id", "layer", "eta_scaling")
    index = {tuple(r[k] for k in key): r for r in committed}
    fields = ("efficacy", "eta", "neighborhood", "paraphrase")  # ppl was measured for other line settings
    return _compare("baselines/layer_sweep/rows.csv", [{f: index[tuple(r[k] for k in key)][f] for f in fields}
                                                       for r in rerun], [{f: r[f] for f in fields} for r in rerun])


def _min_lr(work: Path) -> int:
    """Records 55 and 70 of the minimum-lr study (one finds a minimum at layer 0), two layers, SHIFT/SGD/ADAM.
    Compared with ``--against`` only: the committed rows were measured by older code."""
    _cli("sweep", "--model", "smollm2-135m", "--study", "min-lr", "--case-ids", "55,70", "--layers", "0,29",
         "--rel-tol", "0.05", "--threads", "1", "--out", str(work))
    return 0


def _bench(alg: str, limit: int, *extra: str) -> Callable[[Path], int]:
    """Single-edit ``shift-edit bench`` on the first records of the ROME-format file (generation, KL and
    perplexity on). Compared with ``--against`` only: the committed bench reports keep summaries, not cases.
    Each record is scored alone (``--score-records 1``, the reference path): the default packs several records'
    unedited passes into shared batches, whose values differ by float round-off (tests/test_fast_scoring.py)."""

    def case(work: Path) -> int:
        _cli("bench", "--model", "smollm2-135m", "--alg", alg, "--limit", str(limit), "--ppl-every", "1",
             "--data", str(_data_dir() / "counterfact-original-format-subset837.json"), "--no-progress",
             "--skip-wild", "--score-records", "1", *extra, "--out", str(work))  # the protocol of earlier runs
        return 0

    return case


def _against(out: Path, before: Path, folder: str) -> int:
    """Every JSON / CSV file of one case's folder compared with the earlier run's."""
    bad = 0
    files = sorted(p for p in (before / folder).rglob("*") if p.suffix in (".json", ".csv") and p.is_file())
    for old in files:
        rel = old.relative_to(before)
        new = out / rel
        if "state" in rel.parts or rel.name == "hparams.json":
            continue  # resumable state holds timings; the hparams are the committed run's
        if not new.is_file():
            print(f"  MISSING {rel}")
            bad += 1
        elif old.suffix == ".csv":
            bad += _compare(f"[against] {rel}", _rows(old), _rows(new))
        else:
            bad += _compare(f"[against] {rel}", json.loads(old.read_text()), json.loads(new.read_text()))
    return bad


#: name -> (its folder under the work folder, the case); ``summarize`` is compared with the committed files only
CASES: dict[str, tuple[str, Callable[[Path], int]]] = {
    "summarize": ("summary", _summarize),
    "seq-shift": ("SHIFT", _sequential("SHIFT", "SHIFT", 10, 1)),
    "seq-shift-plus": ("SHIFT_PLUS", _sequential("SHIFT_PLUS", "SHIFT_PLUS", 10, 1)),
    "seq-alphaedit": ("AlphaEdit-T50-B10", _sequential("AlphaEdit-T50-B10", "AlphaEdit", 10, 10)),
    "seq-ft": ("FT", _sequential("FT", "FT", 5, 1)),
    "layer-sweep": ("layer_sweep", _layer_sweep),
    "min-lr": ("min_lr", _min_lr),
    "bench-shift": ("bench-SHIFT", _bench("SHIFT", 3)),
    "bench-rome": ("bench-ROME", _bench("ROME", 1, "--skip-generation")),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these (repeatable)")
    parser.add_argument("--against", type=Path, help="an earlier work folder: compare every file with it too")
    parser.add_argument("--compare-only", action="store_true",
                        help="run nothing: compare the files already in --out with --against")
    args = parser.parse_args()
    if not _data_dir().is_dir():
        print(f"no data at {_data_dir()}: set SHIFT_EDIT_DATA", file=sys.stderr)
        return 2
    if args.compare_only and (args.out is None or args.against is None):
        parser.error("--compare-only needs --out and --against")
    out = args.out or Path(tempfile.mkdtemp(prefix="shift_edit_reproduce_"))
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in args.case or list(CASES):
        print(f"== {name}", flush=True)
        folder, case = CASES[name]
        (out / folder).mkdir(parents=True, exist_ok=True)
        if not args.compare_only:
            failures += case(out / folder)
        if args.against is not None and name != "summarize":
            failures += _against(out, args.against, folder)
    print(f"== {'all values equal' if not failures else f'{failures} differences'} (work folder {out})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
