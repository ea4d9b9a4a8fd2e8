"""``shift-edit export-lora``: turn a patch file into a PEFT LoRA adapter folder."""

from __future__ import annotations

import argparse

from ..core.errors import ShiftEditError
from ..files.lora import LoraExport, export_lora
from .common import add_unchecksummed_argument, check_new_dir

NAME = "export-lora"
HELP = "convert an edit patch into a standard PEFT LoRA adapter folder (load it with peft)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("patch", help="patch file written by `shift-edit edit --save-patch` (or an adapter folder)")
    p.add_argument("out_dir", metavar="DIR", help="adapter folder to create (absent or empty)")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="truncate each module's delta to rank R by SVD (required for dense deltas); "
                        "the relative reconstruction error is printed")
    p.add_argument("--base-model", default=None, metavar="NAME",
                   help="base_model_name_or_path for adapter_config.json (default: the model the edit was made on)")
    add_unchecksummed_argument(p)


def describe(export: LoraExport) -> str:
    """One line per module plus the file size, for the CLI."""
    lines = [
        f"  {m}: rank {r}" + ("" if export.relative_errors[m] == 0 else f", relative error "
                              f"{export.relative_errors[m]:.4g}")
        for m, r in export.ranks.items()
    ]
    kind = "exact" if export.exact else "truncated"
    return "\n".join([f"LoRA adapter written: {export.path} ({export.size_bytes} bytes of weights, {kind})", *lines])


def run(args: argparse.Namespace) -> int:
    out = check_new_dir(args.out_dir, "DIR")
    if args.rank is not None and args.rank < 1:
        raise ShiftEditError(f"--rank must be >= 1, got {args.rank}")
    print(describe(export_lora(args.patch, out, rank=args.rank, base_model_name_or_path=args.base_model,
                               allow_unchecksummed=args.allow_unchecksummed)))
    return 0
