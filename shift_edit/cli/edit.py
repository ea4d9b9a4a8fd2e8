"""``shift-edit edit``: edit one fact, show the top-k next tokens before and after, save."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..algorithms import DEFAULT_ALGORITHM
from ..core.editing import edit
from ..core.errors import ShiftEditError
from ..core.registry import algorithm_names, cli_options, get_algorithm, step_fields
from ..core.requests import make_request
from ..core.result import fmt_prob
from ..core.shipped_hparams import hparams_model_mismatch, shipped_hparams  # noqa: F401 - shipped_hparams re-exported
from ..core.step_search import search_step
from ..files.io import atomic_dir, atomic_file
from ..files.lora import export_lora
from ..model.loading import check_model_name
from ..model.scoring import next_token_topk
from .common import (
    add_model_arguments,
    check_model_args,
    check_new_dir,
    check_new_file,
    check_top_k,
    find_hparams,
    format_topk,
    load_from_args,
    save_pretrained,
)
from .export_lora import describe

NAME = "edit"
HELP = "edit one fact and print the top-k next tokens before and after"
#: exit code of an edit that ran but did not make the target the strict top-1 (outputs are still written)
EXIT_NOT_TOP1 = 3
EPILOG = (f"exit codes: 0 the target is now the strict top-1 (every target token the argmax); "
          f"{EXIT_NOT_TOP1} the edit was made and saved but the target is not the top-1 (try --until-top1 "
          f"or a larger --eta); 2 bad input, nothing written.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the prompt, or a template with {} for --subject")
    p.add_argument("--subject", default=None, help="the subject (required if --prompt has {})")
    p.add_argument("--target", required=True, help="the new object, e.g. Rome: surrounding spaces are stripped and one "
                   "leading space is added (no space after a prompt ending in a space or newline)")
    p.add_argument("--alg", default=DEFAULT_ALGORITHM, choices=algorithm_names(),
                   help=f"algorithm (default {DEFAULT_ALGORITHM})")
    p.add_argument("--hparams", default=None, help="hparams YAML (default: hparams/<ALG>/<model>.yaml if shipped)")
    p.add_argument("--layer", type=int, action="append", default=None,
                   help="layer to edit (repeat for several); overrides hparams")
    by_field: dict[str, list[str]] = {}
    for alg, field in step_fields().items():
        by_field.setdefault(field, []).append(alg)
    steps = ", ".join(f"{'/'.join(algs)} {field}" for field, algs in by_field.items())
    p.add_argument("--eta", type=float, default=None, help=f"step size ({steps}); overrides hparams")
    for opt in cli_options().values():  # the algorithm-specific ones, from the registry
        p.add_argument(_flag(opt.field), choices=opt.choices, default=None, help=f"{'/'.join(opt.owners)}: {opt.help}")
    p.add_argument("--no-skip", action="store_true", help="edit even if the target is already the top-1 prediction")
    p.add_argument("--until-top1", action="store_true",
                   help="search the step size (eta, lr: the algorithm's step field) by doubling then bisecting, one "
                        "edit + one forward pass per try, until the target is the strict top-1; prints what it chose")
    p.add_argument("--top-k", type=int, default=5, help="how many next tokens to show (default 5)")
    p.add_argument("--save", default=None, metavar="DIR", help="save the edited model (save_pretrained, safetensors)")
    p.add_argument("--save-patch", default=None, metavar="FILE", help="save the edit as a small patch file")
    p.add_argument("--save-lora", default=None, metavar="DIR", help="save the edit as a PEFT LoRA adapter folder")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="with --save-lora: truncate to rank R (needed for dense deltas of other algorithms)")
    p.add_argument("--force", action="store_true",
                   help="skip the edit guard (the bound max_relative_norm on ||dW||/||W|| and the check that the "
                        "edit prompt's outputs stay finite)")


def _flag(field: str) -> str:
    """``eta_scaling`` -> ``--eta-scaling``."""
    return "--" + field.replace("_", "-")


def _overrides(args: argparse.Namespace) -> dict:
    """The hparams fields the command line sets; an option the algorithm does not take is an error."""
    overrides = {}
    if args.layer:
        overrides["layers"] = args.layer
    alg = get_algorithm(args.alg)
    if args.eta is not None:
        field = alg.step_field
        if field is None:
            raise ShiftEditError(f"--eta does not apply to {args.alg} (it has no single step size); use --hparams FILE")
        overrides[field] = args.eta
    for field, opt in cli_options().items():
        if getattr(args, field) is None:
            continue
        if field not in alg.cli_options:
            raise ShiftEditError(f"{_flag(field)} is a {'/'.join(opt.owners)} option, not {args.alg}'s")
        overrides[field] = getattr(args, field)
    if args.no_skip:
        overrides["skip_if_predicted"] = False
    return overrides


def resolve_hparams(args: argparse.Namespace):
    check_model_name(args.model)  # a misspelt alias is one line now, not "no shipped hparams"
    overrides = _overrides(args)
    hp = find_hparams(args.alg, args.model, args.hparams)
    if hp is not None:
        return hp.replace(**overrides) if overrides else hp
    if "layers" not in overrides or get_algorithm(args.alg).step_field not in overrides:
        raise ShiftEditError(f"no shipped {args.alg} hparams for {args.model!r}: pass --hparams FILE, or --layer and "
                             f"--eta")
    return get_algorithm(args.alg).hparams_class.from_dict({"model_name": args.model, **overrides},
                                                           source="command line")


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ShiftEditError(f"--top-k must be >= 1, got {args.top_k}")
    save_dir = check_new_dir(args.save, "--save")
    patch_path = check_new_file(args.save_patch, "--save-patch")
    lora_dir = check_new_dir(args.save_lora, "--save-lora")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ShiftEditError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.lora_rank is not None and lora_dir is None:
        raise ShiftEditError("--lora-rank needs --save-lora DIR")
    request = make_request({"prompt": args.prompt, "subject": args.subject, "target_new": args.target})
    check_model_args(args)
    hparams = resolve_hparams(args)
    if args.until_top1 and get_algorithm(args.alg).step_field is None:
        raise ShiftEditError(f"--until-top1 needs an algorithm with a step size; {args.alg} has none")
    model, tok = load_from_args(args)
    check_top_k(args.top_k, model)
    before = next_token_topk(model, tok, request.text, args.top_k)
    if args.until_top1:
        search = search_step(model, tok, request, hparams)
        print(search.line())
        if search.found:
            hparams = hparams.replace(**{search.field: search.step})
    result = edit(model, tok, request, hparams,
                  force=args.force)  # an error it raises names the model the hparams were written for
    note = hparams_model_mismatch(hparams, model)
    if note:  # after the edit: when the hparams cannot fit at all, the error above is the one line
        print(f"warning: {note}; the edit may not work as tuned (pass --hparams for this model)", file=sys.stderr)
    after = next_token_topk(model, tok, request.text, args.top_k)
    print(f"prompt: {request.text!r}   target: {request.target_new!r}")
    print(f"before: {format_topk(before)}")
    print(f"after:  {format_topk(after)}")
    if result.skipped[0]:
        print("skipped: the target was already the top-1 prediction (use --no-skip to edit anyway)")
    summary = result.summary()
    for row in summary:
        rank = "dense" if row["rank"] is None else f"rank {row['rank']}"
        print(f"changed {row['module']} (layer {row['layer']}): {rank}, "
              f"|delta| {row['delta_norm']:.4g}, relative {row['relative_norm']:.3g}")
    outcome = result.outcome()[0]
    print(outcome.line())
    _write_outputs(args, model, tok, result, patch_path, lora_dir, save_dir)
    if not outcome.top1_after:
        field = get_algorithm(args.alg).step_field
        fix = (f"--until-top1 or a larger --eta (now {getattr(hparams, field):.4g})" if field
               else "other hparams (--hparams FILE, e.g. another --layer)")
        print(f"warning: the edit did not make {request.target_new!r} the top-1 (P {fmt_prob(outcome.prob_after)}); "
              f"try {fix}; exit code {EXIT_NOT_TOP1}", file=sys.stderr)
        return EXIT_NOT_TOP1
    return 0


def _write_outputs(args, model, tok, result, patch_path, lora_dir, save_dir) -> None:
    """Write the requested outputs all or nothing: each goes to a hidden sibling first, and
    they are moved into place only when every one was written (a refused LoRA export of a
    dense delta, say, leaves no patch file behind)."""
    lines: list[str] = []
    with contextlib.ExitStack() as staged:  # on leaving: all moved into place, or all removed
        if patch_path is not None:
            if not result.deltas:
                lines.append("no patch written: the edit changed nothing (the target was already the top-1)")
            else:
                tmp = staged.enter_context(atomic_file(patch_path))
                result.save_patch(tmp)
                lines.append(f"patch written: {patch_path} ({tmp.stat().st_size} bytes)")
        if lora_dir is not None:
            if all(result.skipped):
                lines.append("no LoRA adapter written: the edit changed nothing")
            else:
                tmp = staged.enter_context(atomic_dir(lora_dir))  # checked absent or empty before the edit
                lines.append(
                    describe(export_lora(result, tmp, rank=args.lora_rank, overwrite=True)).replace(
                        str(tmp), str(lora_dir)
                    )
                )
        if save_dir is not None:
            tmp = staged.enter_context(atomic_dir(save_dir))
            save_pretrained(model, tok, tmp)  # a full disk: OSError, exit 2, nothing left
            lines.append(f"model written: {save_dir}")
    for line in lines:
        print(line)
