"""``shift-edit apply-patch``: apply a patch file to its base model, show its effect, save."""

from __future__ import annotations

import argparse

from ..patch import apply_patch, read_edit
from ..scoring import next_token_topk
from .common import add_model_arguments, check_new_dir, format_topk, load_from_args, save_model_atomically

NAME = "apply-patch"
HELP = "apply an edit patch to its base model (refused if the base weights differ)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("patch", help="patch file (`shift-edit edit --save-patch`) or LoRA adapter folder (`--save-lora`, `export-lora`)")
    add_model_arguments(p)
    p.add_argument("--prompt", default=None, help="show the top-k next tokens for this prompt before and after (default: the patch's prompts)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--save", default=None, metavar="DIR", help="save the patched model (save_pretrained)")


def run(args: argparse.Namespace) -> int:
    save_dir = check_new_dir(args.save, "--save")
    meta, _ = read_edit(args.patch)
    model, tok = load_from_args(args)
    prompts = [args.prompt] if args.prompt else [
        r["prompt"].format(r["subject"]) if "{}" in r["prompt"] else r["prompt"] for r in meta["requests"]
    ]
    before = [next_token_topk(model, tok, p, args.top_k) for p in prompts]
    result = apply_patch(model, args.patch)
    for p, b in zip(prompts, before):
        print(f"prompt: {p!r}")
        print(f"before: {format_topk(b)}")
        print(f"after:  {format_topk(next_token_topk(model, tok, p, args.top_k))}")
    print(f"applied {len(result.deltas)} delta(s) from {args.patch}")
    if save_dir is not None:
        save_model_atomically(model, tok, save_dir)
        print(f"model written: {save_dir}")
    return 0
