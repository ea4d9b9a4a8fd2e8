"""How many corpus tokens ROME's covariance C = E[k kᵀ] needs: edit results against the token count.

For each record, ROME's v* (which does not depend on C) is optimised once; then the rank-one
update is built with u = C⁻¹ k* for C from each token count (and with u = k*, "no C"), applied
alone to the unedited model, scored with the benchmark's scorer (both metric families), undone.
So the rows differ only in C. Also reported: the cosine between each row's u and the u of the
largest token count, averaged over records.

    SHIFT_EDIT_DATA=/work/shared/data python eval/rome_mom2_tokens.py \
        --hparams hparams/ROME/smollm2-135m.yaml --tokens 10000 30000 100000 300000 --n 40 \
        --out eval/reports/rome_mom2_tokens
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import shift_edit
from shift_edit.algorithms.common import adapter_for
from shift_edit.algorithms.locate.contexts import templates_for
from shift_edit.algorithms.locate.rome import rank_one_factors
from shift_edit.algorithms.locate.zstar import optimise_delta
from shift_edit.bench.counterfact import file_sha256, load_counterfact
from shift_edit.bench.metrics import CaseScorer, metrics_from_scores
from shift_edit.bench.summarize import harmonic_mean, stats
from shift_edit.core.deltas import WeightDelta
from shift_edit.files.data_files import require_data
from shift_edit.files.io import atomic_write_json, atomic_write_text, provenance
from shift_edit.model.covariance import layer_stats
from shift_edit.studies.common import temporarily_applied

COLUMNS = [("ES", "rome", "rewrite_success"), ("PS", "rome", "paraphrase_success"),
           ("NS", "rome", "neighborhood_success"), ("efficacy_top1", "top1", "rewrite_acc"),
           ("paraphrase_top1", "top1", "paraphrase_acc"), ("neighborhood_top1", "top1", "neighborhood_acc")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparams", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000])
    ap.add_argument("--data", default=None, help="CounterFact JSON (default: the shared 837-record subset)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="folder for results.json and README-ready results.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else require_data("counterfact-subset")
    cases = load_counterfact(data, start=args.start, limit=args.n)
    model, tok = shift_edit.load_model(args.model)
    hp = shift_edit.load_hparams(args.hparams).replace(skip_if_predicted=False)
    adapter = adapter_for(model, hp)
    layer = adapter.check_layer(hp.layers[0])
    name = adapter.ff2_name(layer)
    layout = adapter.layout(adapter.module(name))

    stat_s, per_count = {}, {}
    for n in sorted(set(args.tokens)):
        t0 = time.perf_counter()
        s = layer_stats(model, tok, [layer], corpus=hp.mom2_corpus, n_tokens=n, max_length=hp.mom2_max_length,
                        dtype=hp.mom2_dtype, adapter=adapter)[layer]
        stat_s[n] = time.perf_counter() - t0
        if s.n_tokens < n:
            logging.warning("corpus has %d tokens: the %d-token row uses all of them", s.n_tokens, n)
        per_count[n] = s
    rows = {f"{n} tokens": s for n, s in per_count.items()} | {"no C (u = k*)": None}
    largest = f"{max(per_count)} tokens"
    templates = templates_for(model, tok, hp)
    per_row: dict[str, list[dict]] = {r: [] for r in rows}
    for case in tqdm(cases, desc="records", unit="rec"):
        dr = optimise_delta(model, tok, adapter, layer, case.request, templates, hp, ref="ff2_output")
        k_star = dr.keys.mean(0)
        scorer = CaseScorer(tok, case)
        factors = {r: rank_one_factors(dr.delta, k_star, s) for r, s in rows.items()}
        for r, (left, right) in factors.items():
            delta = WeightDelta(name, layout, left=left, right=right, layer=layer)
            with temporarily_applied(model, [delta]):
                m = metrics_from_scores(scorer.scores(scorer.logits(model)))
            m["u_cosine_to_largest"] = float(
                F.cosine_similarity(right[0].double(), factors[largest][1][0].double(), dim=0)
            )
            per_row[r].append(m)

    table = {}
    for r, ms in per_row.items():
        cols = {col: stats([100.0 * m[fam][key] for m in ms]) for col, fam, key in COLUMNS}
        cols["S"] = harmonic_mean([cols["ES"]["mean"], cols["PS"]["mean"], cols["NS"]["mean"]])
        cols["u_cosine_to_largest"] = stats([m["u_cosine_to_largest"] for m in ms])["mean"]
        s = rows[r]
        cols["tokens_used"] = s.n_tokens if s is not None else 0
        cols["texts_used"] = int(s.meta["n_texts"]) if s is not None else 0
        table[r] = cols
    out = Path(args.out)
    result = {
        "protocol": {
            "what": "ROME edits whose rows differ only in the covariance C (same v*, same k*); one record at a time "
                    "on the unedited model, undone after scoring; skip_if_predicted off",
            "metric_families": {"ES/PS/NS": "ROME probability comparisons from mean token NLLs",
                                "*_top1": "strict top-1 (every target token argmax; neighborhood = TRUE object)"},
            "data": {"path": str(data), "sha256": file_sha256(data), "start": args.start, "n": len(cases)},
            "corpus": {n: {k: s.meta[k] for k in ("corpus", "corpus_sha", "n_tokens", "n_texts", "max_length", "dtype")}
                       for n, s in per_count.items()},
            "stats_seconds": stat_s,
            "hparams": hp.to_dict(),
            "provenance": provenance(model),
        },
        "rows": table,
    }
    atomic_write_json(out / "results.json", result)
    head = ("| C from | tokens (texts) | ES | PS | NS | S | efficacy top-1 | paraphrase top-1 | neighborhood top-1 "
            "| cos(u, u_largest) |")
    lines = [head, "|" + "---|" * 10]
    for r, c in table.items():
        lines.append(
            f"| {r} | {c['tokens_used']} ({c['texts_used']}) | "
            + " | ".join(f"{c[k]['mean']:.1f} ± {c[k]['ci95']:.1f}" for k in ("ES", "PS", "NS"))
            + f" | {c['S']:.1f} | "
            + " | ".join(
                f"{c[k]['mean']:.1f} ± {c[k]['ci95']:.1f}"
                for k in ("efficacy_top1", "paraphrase_top1", "neighborhood_top1")
            )
            + f" | {c['u_cosine_to_largest']:.3f} |"
        )
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    logging.info("\n".join(lines))


if __name__ == "__main__":
    main()
