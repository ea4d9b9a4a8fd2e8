"""``shift-edit apply-patch``: apply a patch file to its base model, show its effect, save."""

from __future__ import annotations

import argparse

from ..core.errors import ShiftEditError
from ..core.requests import make_request
from ..files.patch import BASE_CHECKS, apply_patch, read_edit
from ..model.scoring import next_token_topk
from . import common

NAME = "apply-patch"
HELP = "apply an edit patch to its base model (refused if the base weights differ)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("patch",
                   help="patch file (`shift-edit edit --save-patch`) or LoRA adapter folder (`--save-lora`, "
                   "`export-lora`)")
    common.add_model_arguments(p)
    p.add_argument("--prompt", default=None,
                   help="show the top-k next tokens for this prompt before and after (default: the patch's prompts)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--save", default=None, metavar="DIR", help="save the patched model (save_pretrained)")
    p.add_argument("--base-check", choices=BASE_CHECKS, default="model",
                   help="model (default): the whole base model must be the one the patch was made for; "
                        "matrices: only the matrices the patch changes must match (to stack patches of different "
                        "layers)")
    p.add_argument("--force", action="store_true",
                   help="skip the edit guard (relative-norm bound, finite outputs); the checksum and base checks stay")
    common.add_unchecksummed_argument(p)


def run(args: argparse.Namespace) -> int:
    save_dir = common.check_new_dir(args.save, "--save")
    common.check_model_args(args)
    meta, _ = read_edit(args.patch, allow_unchecksummed=args.allow_unchecksummed)  # checksum verified before loading
    try:
        prompts = [args.prompt] if args.prompt else [make_request(r).text for r in meta["requests"]]
    except (KeyError, TypeError) as exc:
        raise ShiftEditError(f"{args.patch}: the patch's requests are malformed ({exc})") from None
    model, tok = common.load_from_args(args)
    common.check_top_k(args.top_k, model)
    before = [next_token_topk(model, tok, p, args.top_k) for p in prompts]
    result = apply_patch(model, args.patch, tok=tok, base_check=args.base_check, force=args.force,
                         allow_unchecksummed=args.allow_unchecksummed)
    for p, b in zip(prompts, before):
        print(f"prompt: {p!r}")
        print(f"before: {common.format_topk(b)}")
        print(f"after:  {common.format_topk(next_token_topk(model, tok, p, args.top_k))}")
    print(f"applied {len(result.deltas)} delta(s) from {args.patch}")
    if save_dir is not None:
        common.save_model_atomically(model, tok, save_dir)
        print(f"model written: {save_dir}")
    return 0
