"""Per-edit wall time of SHIFT vs SGD vs ADAM vs FT (late and early MLP) vs FT_L (or any registered
algorithm: SHIFT_PLUS, ROME, MEMIT, AlphaEdit), measured in one run, each also as a ratio to one forward pass.

Every algorithm edits the same CounterFact records, interleaved record by record so
machine load affects all alike; each timed edit is ``shift_edit.edit`` (compute the
deltas + apply them), followed by an untimed ``undo()``. ``skip_if_predicted`` is off
for all, so every algorithm does its full work (SHIFT then stops its forward pass after
the edited layer). Prints the median time per edit, each one's ratio to SHIFT and to one forward
pass of the record's prompt (timed in the same loop); the target is SHIFT >= 50x faster than FT.
z* caches (MEMIT, AlphaEdit) are off, so every edit computes its z*.

Models:
- ``smollm2-135m``: the embedded model with its shipped hparams (``hparams/<ALG>/smollm2-135m[-early].yaml``).
- ``gpt2-xl-shape``: GPT-2 XL's architecture (48 layers, d 1600, 1.56B parameters, fp32) with
  random weights, built from its config because the hub is not reachable here, edited with the
  GPT-2 XL hparams (SHIFT and FT at MLP 35, FT early at MLP 0; SGD/ADAM at MLP 35 inline, timing
  only). Timing does not depend on the weights' values, but FT's early stop does: on random
  weights one step already drives the NLL below 1e-2, so here FT's early stop is off and it takes
  its 25 steps, as the median SmolLM2 edit does (median 25, range 11-25). Prompts
  are tokenized with SmolLM2's tokenizer (its ids fit GPT-2's vocabulary; lengths are alike).

Usage::

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. python eval/bench_edit_time.py --n 10 --threads 2
    ... --model gpt2-xl-shape --n 4 --algs SHIFT,SGD,FT,FT:early
    ... --case-ids 104,212,715 (records of your choice)
    ... --algs SHIFT,SHIFT_PLUS,ROME=path/to/ROME.yaml,MEMIT,AlphaEdit   (ALG=FILE: that hparams file)
    ... --batch 100   (also: one edit call with the next 100 records together, per algorithm; throughput
                       at B = 100 against B = 1, the median single edit above)

With ``--batch B`` each algorithm, after the single edits, makes one ``shift_edit.edit`` call with B requests (records
n+1 .. n+B, so none was timed alone), timed and undone; requests per second at B divided by requests per second at
B = 1 is the throughput ratio. The batch call lifts the edit guard's norm bound (``max_relative_norm``: B summed
updates may change more than one edit may); the guard's pass over the B prompts still runs. ``--batch-algs`` limits
that call to some of the algorithms (ROME, MEMIT and AlphaEdit optimise one z* per request, so their batch costs
about B single edits).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.core.registry import get_algorithm
from shift_edit.core.requests import encode_prompt, make_request
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.studies.counterfact_records import load_records

REPO = Path(__file__).resolve().parents[1]
TARGET = 50.0
# --model -> (default --algs, hparams file stem, whether the weights are random)
MODELS = {
    "smollm2-135m": ("SHIFT,SGD,ADAM,FT,FT:early,FT_L", "smollm2-135m", False),
    "gpt2-xl-shape": ("SHIFT,SGD,ADAM,FT,FT:early", "gpt2-xl", True),
}
# GPT-2 XL ships no SGD/ADAM hparams (not tuned without the model); these time the same step at MLP 35
INLINE = {
    ("gpt2-xl", "SGD"): lambda: get_algorithm("SGD").hparams_class(layers=[35], lr=1.0),
    ("gpt2-xl", "ADAM"): lambda: get_algorithm("ADAM").hparams_class(layers=[35], lr=1e-3),
}


def load(model_name: str):
    """(model, tokenizer) of ``--model`` (one of :data:`MODELS`)."""
    model, tok = se.load_model("smollm2-135m")
    if model_name == "gpt2-xl-shape":  # SmolLM2's tokenizer, GPT-2 XL's architecture
        from transformers import GPT2Config, GPT2LMHeadModel

        del model
        torch.manual_seed(0)
        config = GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)
        model = GPT2LMHeadModel(config).eval()
        model._shift_edit_name = "gpt2-xl-shape (GPT-2 XL config, random weights)"
    return model, tok


def hparams_for(spec: str, stem: str, random_weights: bool):
    """Hparams of ``ALG`` or ``ALG:variant`` (``hparams/ALG/<stem>-<variant>.yaml``), skip check off
    (and, on random weights, FT's early stop off: see the module docstring)."""
    alg, eq, file = spec.partition("=")
    alg, _, variant = alg.partition(":")
    path = Path(file) if eq else REPO / "hparams" / alg / (f"{stem}-{variant}.yaml" if variant else f"{stem}.yaml")
    path = path if path.is_absolute() else (Path.cwd() / path).resolve()
    if path.is_file():
        hp, source = se.load_hparams(path), str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    elif (stem, spec) in INLINE:
        hp = INLINE[(stem, spec)]()
        source = f"inline (timing only): layers={hp.layers} lr={hp.lr}"
    else:
        raise ValueError(f"no hparams for {spec}: {path} is missing")
    hp = hp.replace(skip_if_predicted=False)
    if getattr(hp, "zstar_cache", False):
        hp = hp.replace(zstar_cache=False)
    if random_weights and hasattr(hp, "early_stop_nll"):
        hp, source = hp.replace(early_stop_nll=0.0), source + ", early stop off"
    return hp, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    ap.add_argument("--n", type=int, default=10, help="timed records (edits per algorithm), after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case-ids", default=None,
                    help="comma list of CounterFact case ids to time instead of the first --n (the first is also the "
                    "warm-up)")
    ap.add_argument("--algs", default=None, help="comma list of ALG or ALG:variant (default: per model)")
    ap.add_argument("--out", default=None, help="also write the numbers and the protocol to this JSON file")
    ap.add_argument("--batch", type=int, default=0, help="also time one edit of this many requests per algorithm")
    ap.add_argument("--batch-algs", default=None, help="comma list: the algorithms --batch times (default: all)")
    args = ap.parse_args()
    default_algs, stem, random_weights = MODELS[args.model]
    specs = (args.algs or default_algs).split(",")  # "ALG=FILE" is shown and saved as ALG
    if specs[0] != "SHIFT":
        ap.error("--algs must start with SHIFT (ratios are to SHIFT)")
    # every input is checked before the model (1.56B parameters for gpt2-xl-shape) is built
    try:
        hps = {s.split("=")[0]: hparams_for(s, stem, random_weights) for s in specs}
        specs = list(hps)
        if args.case_ids:
            if not all(c.strip().isdigit() for c in args.case_ids.split(",")):
                raise ValueError(f"--case-ids must be comma-separated integers, got {args.case_ids!r}")
            chosen = load_records(case_ids=[int(c) for c in args.case_ids.split(",")])
            records, label = chosen[:1] + chosen, f"case ids {args.case_ids} (the first also as warm-up)"
        else:
            records, label = load_records(n=args.n + 1), f"records 1..{args.n} of the subset, record 0 as warm-up"
        batch_records = load_records(n=args.n + 1 + args.batch)[args.n + 1:] if args.batch > 0 else []
        batch_algs = (args.batch_algs.split(",") if args.batch_algs else specs) if args.batch > 0 else []
        if set(batch_algs) - set(specs):
            raise ValueError(f"--batch-algs names algorithms not in --algs: {sorted(set(batch_algs) - set(specs))}")
    except (ValueError, se.ShiftEditError) as exc:
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    n_timed = len(records) - 1
    times: dict[str, list[float]] = {s: [] for s in specs}
    fwd: list[float] = []
    steps: dict[str, list[int]] = {s: [] for s in specs if s.startswith("FT")}
    for i, rec in enumerate(records):
        ids = torch.tensor([encode_prompt(tok, make_request(rec).text)])
        with torch.no_grad():
            t0 = time.perf_counter()
            model(input_ids=ids)
            if i:
                fwd.append(time.perf_counter() - t0)
        for s in specs:
            t0 = time.perf_counter()
            res = se.edit(model, tok, rec, hps[s][0])
            dt = time.perf_counter() - t0
            res.undo()
            if i == 0:
                continue  # warm-up record, not timed
            times[s].append(dt)
            if s in steps:
                steps[s].append(res.info[0]["steps"])
    batch_s = {}
    for s in batch_algs:
        # B summed updates may exceed the single-edit norm bound (SHIFT at B = 100: 1.19 of ||W||); the guard's
        # pass still runs
        hp = hps[s][0].replace(max_relative_norm=None) if hasattr(hps[s][0], "max_relative_norm") else hps[s][0]
        t0 = time.perf_counter()
        res = se.edit(model, tok, batch_records, hp)
        batch_s[s] = time.perf_counter() - t0
        res.undo()
    med = {s: statistics.median(v) for s, v in times.items()}
    fwd_med = statistics.median(fwd)
    print(f"{args.model}, CPU, {args.threads} thread(s), {n_timed} CounterFact edits per algorithm "
          f"({label}), skip_if_predicted off")
    for s in specs:
        extra = ""
        if s in steps:
            extra = f"   steps median {statistics.median(steps[s]):g} (range {min(steps[s])}-{max(steps[s])})"
        print(f"{s:10s} median {med[s] * 1e3:9.1f} ms/edit   ratio to SHIFT {med[s] / med['SHIFT']:7.1f}x"
              f"   to one forward pass {med[s] / fwd_med:7.1f}x   ({hps[s][1]}){extra}")
    print(f"one forward pass of the record's prompt: median {fwd_med * 1e3:.1f} ms")
    per_step = {s: statistics.median(t / max(k, 1) for t, k in zip(times[s], steps[s])) for s in steps}
    for s, t in per_step.items():
        print(f"{s:9s} per optimiser step (edit time / steps, median): {t * 1e3:.1f} ms = "
              f"{t / med['SHIFT']:.2f} SHIFT edits")
    for s in specs:
        if s.startswith("FT"):
            ratio = med[s] / med["SHIFT"]
            verdict = "meets" if ratio >= TARGET else "misses"
            print(f"SHIFT is {ratio:.1f}x faster than {s} ({verdict} the >= {TARGET:g}x target)")
    throughput = {s: med[s] / (t / args.batch) for s, t in batch_s.items()}
    for s, t in batch_s.items():
        print(f"{s:10s} B = {args.batch}: {t:8.1f} s for the batch = {t / args.batch * 1e3:9.1f} ms/request; "
              f"throughput {throughput[s]:5.2f}x of B = 1")
    if args.out:
        atomic_write_json(Path(args.out), {
            "batch": args.batch, "batch_case_ids": [r["case_id"] for r in batch_records],
            "batch_seconds": batch_s, "batch_throughput_ratio": throughput,
            "what": "median wall time of shift_edit.edit per single-record edit (compute + apply; undo untimed), "
                    "algorithms interleaved record by record, skip_if_predicted off",
            "model": args.model, "random_weights": random_weights, "threads": args.threads,
            "records": label, "case_ids": [r["case_id"] for r in records[1:]],
            "load_average_1min": os.getloadavg()[0],
            "hparams": {s: {"source": hps[s][1], **hps[s][0].to_dict()} for s in specs},
            "seconds": times, "median_ms": {s: m * 1e3 for s, m in med.items()},
            "ratio_to_shift": {s: med[s] / med["SHIFT"] for s in specs},
            "forward_pass_seconds": fwd, "forward_pass_median_ms": fwd_med * 1e3,
            "ratio_to_forward_pass": {s: med[s] / fwd_med for s in specs},
            "ft_steps": steps, "ft_ms_per_step": {s: t * 1e3 for s, t in per_step.items()}, "target_ratio": TARGET,
            "provenance": provenance(model),
        })


if __name__ == "__main__":
    main()
