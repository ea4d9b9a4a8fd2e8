"""Edit cost of the forward pass shift on SmolLM2, relative to one forward pass.

Prints, measured in one run on the same prompt:
- median wall time of one full forward pass (the reference),
- median wall time of one SHIFT edit (compute + in-place apply), with the skip check on
  (full forward pass needed) and off (early exit after the edited layer),
- their ratios (target: <= 1.1), the undo time, and the process's peak RSS against the model size.
The undo after each timed edit is not timed.

Usage: python eval/bench_edit_cost.py [--repeats 30] [--threads 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.core.requests import encode_prompt

PROMPT = "The Eiffel Tower is located in the city of"


def median_time(fn, repeats: int, after=None) -> float:
    """Median wall time of ``fn()``; ``after(result)`` runs untimed after each call."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if after is not None:
            after(out)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hparams", default="hparams/SHIFT/smollm2-135m.yaml")
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = se.load_model("smollm2-135m")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    hp = se.ShiftHyperParams.from_hparams(args.hparams)
    request = {"prompt": PROMPT, "target_new": " Rome"}
    ids = torch.tensor([encode_prompt(tok, PROMPT)])

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def time_edit(hparams) -> float:
        return median_time(lambda: se.edit(model, tok, request, hparams), args.repeats, after=lambda r: r.undo())

    for _ in range(5):  # warm-up
        forward()
        se.edit(model, tok, request, hp).undo()
    t_fwd = median_time(forward, args.repeats)
    t_skip = time_edit(hp.replace(skip_if_predicted=True))
    t_early = time_edit(hp.replace(skip_if_predicted=False, early_exit=True))
    t_full = time_edit(hp.replace(skip_if_predicted=False, early_exit=False))
    result = se.edit(model, tok, request, hp.replace(skip_if_predicted=False))
    t0 = time.perf_counter()
    result.undo()
    t_undo = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    layer = hp.layers[0]
    print(f"model: smollm2-135m ({model_mb:.0f} MB fp32), layer {layer} of 30, prompt {len(ids[0])} tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"one full forward pass:                {t_fwd * 1e3:7.2f} ms")
    print(f"edit, skip check on (full pass):      {t_skip * 1e3:7.2f} ms  ratio {t_skip / t_fwd:.2f}")
    print(f"edit, skip off, no early exit:        {t_full * 1e3:7.2f} ms  ratio {t_full / t_fwd:.2f}")
    print(f"edit, skip off, early exit at L{layer}:    {t_early * 1e3:7.2f} ms  ratio {t_early / t_fwd:.2f}")
    print(f"undo alone:                           {t_undo * 1e3:7.2f} ms")
    print(f"peak RSS {rss_peak:.0f} MB after load {rss_loaded:.0f} MB = {rss_peak / model_mb:.2f}x the model size; "
          f"editing added {rss_peak - rss_loaded:.0f} MB")
    if args.out:
        import os

        from shift_edit.files.io import atomic_write_json, provenance

        atomic_write_json(Path(args.out), {
            "what": "SHIFT edit wall time / one full forward pass of the same prompt (median), smollm2-135m",
            "hparams": hp.to_dict(), "prompt": PROMPT, "prompt_tokens": len(ids[0]), "threads": args.threads,
            "repeats": args.repeats, "load_average_1min": os.getloadavg()[0],
            "forward_ms": t_fwd * 1e3, "edit_ms": {"skip_check_on": t_skip * 1e3, "skip_off_full_pass": t_full * 1e3,
                                                   "skip_off_early_exit": t_early * 1e3},
            "ratio": {"skip_check_on": t_skip / t_fwd, "skip_off_full_pass": t_full / t_fwd,
                      "skip_off_early_exit": t_early / t_fwd},
            "undo_ms": t_undo * 1e3, "peak_rss_mb": rss_peak, "model_mb": model_mb,
            "provenance": provenance(model),
        })


if __name__ == "__main__":
    main()
