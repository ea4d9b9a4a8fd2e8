"""``shift-edit stats``: precompute and cache the FF2-input second moments ROME and MEMIT use."""

from __future__ import annotations

import argparse

from ..algorithms.common import adapter_for
from ..compat.easyedit_editor import load_hparams
from ..core.errors import ShiftEditError
from ..model.architectures import ModelAdapter
from ..model.covariance import layer_stats
from .common import add_model_arguments, load_from_args

NAME = "stats"
HELP = "precompute and cache C = E[k kᵀ] of FF2 inputs (for ROME / MEMIT) from a text corpus"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--hparams", default=None,
                   help="ROME/MEMIT hparams YAML: compute exactly the statistics it reads (its layers, corpus, "
                        "token count, truncation length, dtype); the flags below then default to its values")
    p.add_argument("--layer", type=int, action="append", default=None, help="layer (repeat for several; one pass)")
    p.add_argument("--corpus", default=None,
                   help="text file (one text per line) or hf:<dataset>/<config>/<split> "
                        "(default: the wikitext data set if found, see `shift-edit data`, else "
                        "hf:wikitext/wikitext-103-raw-v1/train)")
    p.add_argument("--n-tokens", type=int, default=None, help="token vectors to average over (default 100000)")
    p.add_argument("--max-length", type=int, default=None, help="truncation length per text, in tokens (default 256)")
    p.add_argument("--stats-dtype", choices=["float32", "float64"], default=None,
                   help="accumulation dtype (default float32)")
    p.add_argument("--rebuild", action="store_true", help="ignore an existing cache entry and recompute")


def _settings(args: argparse.Namespace) -> dict:
    """Layers and statistics settings: the flags, else the hparams file's, else the defaults."""
    base = {"layers": None, "corpus": None, "n_tokens": 100_000, "max_length": 256, "dtype": "float32"}
    if args.hparams:
        hp = load_hparams(args.hparams)
        if not hasattr(hp, "mom2_n_tokens"):
            raise ShiftEditError(f"--hparams {args.hparams}: {type(hp).ALG_NAME} uses no covariance statistics")
        base = {"layers": list(hp.layers), "corpus": hp.mom2_corpus, "n_tokens": hp.mom2_n_tokens,
                "max_length": hp.mom2_max_length, "dtype": hp.mom2_dtype}
    given = {"layers": args.layer, "corpus": args.corpus, "n_tokens": args.n_tokens,
             "max_length": args.max_length, "dtype": args.stats_dtype}
    out = {k: given[k] if given[k] is not None else base[k] for k in base}
    if not out["layers"]:
        raise ShiftEditError("give --layer (repeatable) or --hparams FILE")
    return out


def run(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    model, tok = load_from_args(args)
    adapter = ModelAdapter(model)
    if args.hparams:
        adapter = adapter_for(model, load_hparams(args.hparams))
    stats = layer_stats(model, tok, cfg["layers"], corpus=cfg["corpus"], n_tokens=cfg["n_tokens"],
                        max_length=cfg["max_length"], dtype=cfg["dtype"], use_cache=True,
                        adapter=adapter, rebuild=args.rebuild)
    for layer, s in sorted(stats.items()):
        m = s.meta
        print(f"layer {layer}: {m['module']}  d_in={m['d_in']}  tokens={m['n_tokens']}  texts={m['n_texts']}  "
              f"corpus={m['corpus']} ({m['corpus_sha'][:12]})  dtype={m['dtype']}")
    return 0
