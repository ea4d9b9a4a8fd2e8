"""Per-edit wall time of a lifelong (sequential) editor over one run of many edits, with model calls and a profile.

Issue 33, target 1: the median time of ``shift_edit.edit`` (compute + guard + apply + memory) over ``--edits``
sequential edits of one model with one :class:`~shift_edit.core.memory.EditMemory`, as ``shift-edit bench
--sequential T --batch-edits 1`` makes them (an edit the guard refuses counts, as there), then a profile of
``--profile-edits`` more edits of the same run: where the time goes, by phase. Model calls per edit are the
algorithm's own (``info["forward_passes"]``) plus the guard's pass over the edit prompt when an edit is applied.

The records are the first ones of the EasyEdit-format CounterFact edit file, the lifelong runs' records
(``eval/reports/sequential/``), or of ``--data`` (a zsRE or KnowEdit file is read as the benchmark reads it);
statistics and the generic sample are read (or computed) before the first timed edit.

Usage::

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. python eval/bench_lifelong_speed.py --edits 200 --threads 1 \\
        --out eval/reports/speed/lifelong_shift_neuron.json
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import resource
import statistics
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.bench.facts import detect_format, load_facts
from shift_edit.core.errors import EditRefusedError
from shift_edit.core.registry import algorithm_for_hparams
from shift_edit.files.data_files import find_file
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.files.json_records import read_json_records

REPO = Path(__file__).resolve().parents[1]
#: phase -> (file suffix, function name) whose cumulative time the profile reports; "first pass and the rest" is
#: the algorithm's compute time less its listed parts
PHASES = {
    "push search (batched partial passes)": ("shift/shift_neuron.py", "_search_push"),
    "key design (closed-form solves)": ("shift/shift_neuron.py", "_design_neuron"),
    "generic screen": ("shift/neurons.py", "fires_on"),
    "neuron choice": ("shift/neurons.py", "free_neurons"),
    "guard pass (edit prompt, edited model)": ("core/guard.py", "check_outputs"),
    "apply deltas": ("core/deltas.py", "apply_deltas"),
    "memory update": ("core/memory.py", "add"),
}
COMPUTE = ("shift/shift_neuron.py", "compute_shift_neuron")
EDIT = ("core/editing.py", "edit")


def _cumtime(stats: pstats.Stats, where: tuple[str, str]) -> float:
    """Cumulative seconds of the profiled function ``(file suffix, name)`` (0 if it never ran)."""
    return sum(v[3] for (file, _line, name), v in stats.stats.items()  # type: ignore[attr-defined]
               if file.endswith(where[0]) and name == where[1])


#: what each edit decided (``info`` fields), compared by ``--against``
DECISIONS = ("layer", "layers_tried", "push", "neurons", "reached_margin", "generic_fires")


def weights_digest(model: torch.nn.Module, names: list[str]) -> str:
    """sha256 over the named parameters' bytes, in order."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(model.get_parameter(name).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hparams", default=str(REPO / "hparams/SHIFT_NEURON/smollm2-135m-lifelong.yaml"))
    ap.add_argument("--edits", type=int, default=200, help="timed sequential edits (the median is over these)")
    ap.add_argument("--profile-edits", type=int, default=40, help="further edits of the same run, profiled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=None, help="a CounterFact file (default: the EasyEdit-format edit split), or a "
                    "zsRE or KnowEdit file")
    ap.add_argument("--out", default=None, help="also write the numbers and the protocol to this JSON file")
    ap.add_argument("--against", default=None,
                    help="an earlier --out file (e.g. of another commit): exit 1 unless every timed edit's decisions "
                    "and the edited weights after them are the same")
    args = ap.parse_args()
    try:
        hp = se.load_hparams(args.hparams)
        data = Path(args.data) if args.data else find_file("counterfact-easyedit-edit.json")
        if data is None or not data.is_file():
            raise se.ShiftEditError(f"no CounterFact edit file {args.data or 'counterfact-easyedit-edit.json'} "
                                    "(set SHIFT_EDIT_DATA or pass --data)")
        records = read_json_records(data)
        fmt = detect_format(records, data)
        if fmt in ("zsre", "knowedit"):  # their requests, as the benchmark reads them
            records = [c.request for c in load_facts(data, fmt=fmt)]
        records = records[: args.edits + args.profile_edits]
    except se.ShiftEditError as exc:
        ap.error(str(exc))
    if len(records) < args.edits + args.profile_edits:
        ap.error(f"{data} has {len(records)} records, fewer than --edits + --profile-edits")
    torch.set_num_threads(args.threads)
    model, tok = se.load_model(hp.model_name or "smollm2-135m")
    alg = algorithm_for_hparams(hp)
    if alg.prime is not None:
        alg.prime(model, tok, hp)
    memory = se.EditMemory()
    times, calls, refused, skipped, decisions, touched = [], [], 0, 0, [], set()
    profile = cProfile.Profile()
    for k, rec in enumerate(records):
        if k == args.edits:
            profile.enable()
        t0 = time.perf_counter()
        try:
            res = se.edit(model, tok, rec, hp, memory=memory if alg.uses_memory else None)
            info, applied = res.info[0], bool(res.deltas)
            if k < args.edits:
                touched.update(res.orig_weights)
            del res
        except EditRefusedError:
            info, applied = {}, False
            refused += 1
        dt = time.perf_counter() - t0
        if k < args.edits:
            times.append(dt)
            calls.append(int(info.get("forward_passes", 1)) + int(applied))  # + the guard's pass
            skipped += not applied
            decisions.append({key: info.get(key) for key in DECISIONS if key in info})
        if k == args.edits - 1:
            digest = weights_digest(model, sorted(touched))
    profile.disable()
    stats = pstats.Stats(profile)
    n_prof = args.profile_edits
    total, compute = _cumtime(stats, EDIT), _cumtime(stats, COMPUTE)
    phases = {name: _cumtime(stats, where) for name, where in PHASES.items()}
    inner = sum(v for name, v in phases.items() if name in list(PHASES)[:4])
    table = {"first pass (prompt + contrast prompts, all blocks) and the rest of compute": compute - inner, **phases}
    table["other (requests, checks, result)"] = total - sum(table.values())
    med = statistics.median(times)
    print(f"{alg.name} ({args.hparams}), {args.edits} sequential edits of {data.name}, CPU, {args.threads} thread(s)")
    deciles = statistics.quantiles(times, n=10)
    print(f"per edit: median {med:.3f} s, mean {statistics.mean(times):.3f} s, p10 {deciles[0]:.3f} s, "
          f"p90 {deciles[-1]:.3f} s; {skipped} not applied ({refused} refused by the guard)")
    print(f"model calls per edit (the algorithm's + the guard's): median {statistics.median(calls):g}, "
          f"mean {statistics.mean(calls):.2f}, max {max(calls)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"peak RSS of the process {peak / 2**20:.0f} MiB = {peak / size:.2f}x the model's parameters "
          f"({size / 2**20:.0f} MiB)")
    print(f"profile of edits {args.edits + 1}..{args.edits + n_prof} (cProfile on): {total / n_prof:.3f} s per edit")
    for name, sec in table.items():
        print(f"  {name:75s} {sec / n_prof:7.3f} s  {100 * sec / total:5.1f}%")
    if args.out:
        atomic_write_json(Path(args.out), {
            "what": "wall time of shift_edit.edit per sequential edit (compute + guard + apply + memory), one run",
            "algorithm": alg.name, "hparams_file": args.hparams, "hparams": hp.to_dict(), "threads": args.threads,
            "data": data.name, "edits": args.edits, "seconds": times, "median_s": med,
            "model_calls": calls, "not_applied": skipped, "refused_by_guard": refused,
            "profile_edits": n_prof, "profile_s_per_edit": {k: v / n_prof for k, v in table.items()},
            "load_average_1min": os.getloadavg()[0], "provenance": provenance(model),
            "peak_rss_bytes": peak, "model_parameter_bytes": size,
            "decisions": decisions, "edited_weights_sha256": digest, "edited_weights": sorted(touched),
        })
    if args.against:
        old = json.loads(Path(args.against).read_text())
        same = json.loads(json.dumps(decisions)) == old["decisions"]  # through JSON, as written
        same_w = digest == old["edited_weights_sha256"]
        print(f"against {args.against}: decisions of the {args.edits} edits {'equal' if same else 'DIFFER'}, "
              f"edited weights after them {'bit-equal' if same_w else 'DIFFER'}")
        raise SystemExit(0 if same and same_w else 1)


if __name__ == "__main__":
    main()
