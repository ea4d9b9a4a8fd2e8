"""``shift-edit stats``: precompute and cache the FF2-input second moments ROME and MEMIT use."""

from __future__ import annotations

import argparse

from ..architectures import ModelAdapter
from ..stats import layer_stats
from .common import add_model_arguments, load_from_args

NAME = "stats"
HELP = "precompute and cache C = E[k kᵀ] of FF2 inputs (for ROME / MEMIT) from a text corpus"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--layer", type=int, action="append", required=True, help="layer (repeat for several; one pass)")
    p.add_argument("--corpus", default=None,
                   help="text file (one text per line) or hf:<dataset>/<config>/<split> "
                        "(default: ../shared/data WikiText-2 test if present, else hf:wikitext/wikitext-103-raw-v1/train)")
    p.add_argument("--n-tokens", type=int, default=100_000, help="token vectors to average over (default 100000)")
    p.add_argument("--max-length", type=int, default=256, help="truncation length per text, in tokens (default 256)")
    p.add_argument("--stats-dtype", choices=["float32", "float64"], default="float32", help="accumulation dtype")
    p.add_argument("--rebuild", action="store_true", help="ignore an existing cache entry and recompute")


def run(args: argparse.Namespace) -> int:
    model, tok = load_from_args(args)
    stats = layer_stats(model, tok, args.layer, corpus=args.corpus, n_tokens=args.n_tokens,
                        max_length=args.max_length, dtype=args.stats_dtype, use_cache=True,
                        adapter=ModelAdapter(model), rebuild=args.rebuild)
    for layer, s in sorted(stats.items()):
        m = s.meta
        print(f"layer {layer}: {m['module']}  d_in={m['d_in']}  tokens={m['n_tokens']}  texts={m['n_texts']}  "
              f"corpus={m['corpus']} ({m['corpus_sha'][:12]})  dtype={m['dtype']}")
    return 0
