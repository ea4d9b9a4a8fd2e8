"""The push search SHIFT_PLUS and SHIFT_NEURON share: the batch of prompt variants an edit is checked on (the
prompt, the prompt behind fixed context prefixes, the template filled with other subjects), the logit margin of
the target over the runner-up, and the search for the smallest push that reaches a margin by a few batched
partial forward passes (a geometric grid, then finer grids inside the bracket)."""

from __future__ import annotations

import dataclasses
import math

import torch

from ...core.requests import EditRequest, encode_prompt

#: subjects that fill the request's template for the contrastive keys (authored for this module)
CONTRAST_SUBJECTS: tuple[str, ...] = (
    "Paris", "Barack Obama", "Toyota", "the Amazon River", "Albert Einstein", "Microsoft", "Brazil",
    "William Shakespeare", "the Eiffel Tower", "Nintendo", "Mount Everest", "Lionel Messi", "Egypt",
    "the BBC", "Pablo Picasso", "Tokyo", "Beethoven", "Harvard University", "the Pacific Ocean", "Volvo",
    "Queen Victoria", "Sydney", "Google", "Leonardo da Vinci",
)


#: fixed context prefixes put before the prompt (authored for this module)
CONTEXT_PREFIXES: tuple[str, ...] = (
    "Here is a fact. ", "I read this in a book today. ", "The following is well known. ",
    "Notes from the archive: ", "She said that ", "Quiz answer: ", "In short, ", "As everyone knows, ",
)


def validate_batch_and_search(hp) -> None:
    """The checks SHIFT_PLUS and SHIFT_NEURON share: the batch (``n_contrast``, ``n_prefixes``) and the
    push search (``margin``, ``search_passes``, ``search_points``)."""
    if not math.isfinite(hp.margin):
        hp._fail("margin", hp.margin, "it must be finite")
    if not 0 <= hp.n_contrast <= len(CONTRAST_SUBJECTS):
        hp._fail("n_contrast", hp.n_contrast, f"use 0..{len(CONTRAST_SUBJECTS)}")
    if not 0 <= hp.n_prefixes <= len(CONTEXT_PREFIXES):
        hp._fail("n_prefixes", hp.n_prefixes, f"use 0..{len(CONTEXT_PREFIXES)}")
    if hp.search_passes < 1 or hp.search_points < 2:
        hp._fail("search_passes", (hp.search_passes, hp.search_points), "search_passes >= 1 and search_points >= 2")


@dataclasses.dataclass
class Batch:
    """Sequences teacher-forced on the target; the first ``n_variants`` are the prompt and its prefixed variants,
    the rest the contrastive prompts."""

    seqs: list[list[int]]
    positions: list[list[int]]  # per sequence: the positions that predict the target tokens
    n_variants: int


def build_batch(tok, req: EditRequest, target: list[int], *, n_prefixes: int, n_contrast: int,
                all_tokens: bool = True) -> Batch:
    """The prompt, the prompt behind ``n_prefixes`` context prefixes and the template filled with
    ``n_contrast`` other subjects, each teacher-forced on ``target`` (with the positions that predict
    its tokens: all of them, or the first only)."""
    text = req.text
    variants = [text] + [p + text for p in CONTEXT_PREFIXES[:n_prefixes]]
    contrast: list[str] = []
    template = req.prompt if "{}" in req.prompt else None
    if template is None and req.subject and req.subject in text:  # a filled prompt (EasyEdit format)
        template = text.replace("{", "{{").replace("}", "}}").replace(req.subject, "{}", 1)
    if n_contrast and template is not None and req.subject:
        contrast = [template.format(s) for s in CONTRAST_SUBJECTS if s != req.subject][:n_contrast]
    n_tok = len(target) if all_tokens else 1
    seqs, positions = [], []
    for t in variants + contrast:
        ids = encode_prompt(tok, t)
        seqs.append(ids + target[:-1])
        positions.append(list(range(len(ids) - 1, len(ids) - 1 + n_tok)))
    return Batch(seqs, positions, len(variants))


def margins(logits: torch.Tensor, positions: list[list[int]], target: list[int], rows: list[int]) -> torch.Tensor:
    """Per row: the smallest (target logit - best other logit) over its target positions."""
    out = []
    for r in rows:  # row r is variant r % len(positions)
        pos = positions[r % len(positions)]
        lg = logits[r, pos].float()  # [n, vocab]
        tgt = torch.tensor(target[: len(pos)])
        t_logit = lg.gather(1, tgt[:, None])[:, 0]
        other = lg.scatter(1, tgt[:, None], float("-inf")).max(-1).values
        out.append(float((t_logit - other).min()))
    return torch.tensor(out)


def search_push(reaches, max_push: float, points: int, passes: int) -> tuple[float | None, int]:
    """The smallest push that reaches the margin, by batched passes: ``points`` candidates on a
    geometric grid up to ``max_push``, then ``points`` on a linear grid inside the bracket, and so on.

    Args:
        reaches: candidate pushes ``[n]`` (float64) -> whether each reaches the margin ``[n]`` (one
            batched model call).
        max_push: the largest candidate; points: candidates per pass; passes: at most this many calls.

    Returns:
        ``(push, calls)``: the smallest candidate found to reach it (None: none up to ``max_push``) and
        the number of calls of ``reaches`` made.
    """
    lo, hi = 0.0, None
    grid = torch.logspace(0, math.log10(max_push), points, dtype=torch.float64)
    calls = 0
    for it in range(passes):
        ok = reaches(grid)
        calls += 1
        if bool(ok.any()):
            idx = int(ok.nonzero()[0, 0])
            hi = float(grid[idx])
            lo = float(grid[idx - 1]) if idx > 0 else lo
        else:
            lo = float(grid[-1])
        if hi is None or it == passes - 1:
            break
        grid = torch.linspace(lo, hi, points + 1, dtype=torch.float64)[1:]
    return hi, calls
