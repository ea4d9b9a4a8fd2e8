"""Prompt segments of Fig. 6: subject tokens, the last subject token, other tokens, the last token."""

from __future__ import annotations

from ..core.errors import ShiftEditError
from ..core.requests import encode_prompt

SEGMENTS = ("subject", "last_subject", "other", "last")


def subject_token_span(tok, text: str, subject: str) -> tuple[int, int]:
    """``(first, end)`` token indices of the subject in ``encode_prompt(tok, text)``.

    Uses the fast tokenizer's character offsets (a token belongs to the subject when its
    span overlaps the subject's characters); slow tokenizers fall back to tokenising the
    text up to the subject's start (trailing space stripped) and end.
    """
    start = text.find(subject)
    if start < 0:
        raise ShiftEditError(f"subject {subject!r} does not occur in {text!r}")
    stop = start + len(subject)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < stop and b > start]
        if inside:
            return inside[0], inside[-1] + 1
    first = len(encode_prompt(tok, text[:start].rstrip())) if text[:start].strip() else _n_special_prefix(tok)
    return first, len(encode_prompt(tok, text[:stop]))


def token_segments(tok, text: str, subject: str | None, n: int | None = None) -> list[str]:
    """Label each prompt token ``subject``, ``last_subject``, ``other`` or ``last``.

    The final token is ``"last"`` even when it ends the subject. Without a subject every
    token but the last is ``"other"``.
    """
    n = len(encode_prompt(tok, text)) if n is None else n
    labels = ["other"] * n
    if subject:
        first, end = subject_token_span(tok, text, subject)
        for i in range(max(first, 0), min(end, n)):
            labels[i] = "subject"
        if 0 < end <= n:
            labels[end - 1] = "last_subject"
    labels[-1] = "last"
    return labels


def _n_special_prefix(tok) -> int:
    """How many special tokens the tokenizer puts before any text (a BOS, if it adds one)."""
    probe = encode_prompt(tok, "a")
    plain = list(tok("a", add_special_tokens=False).input_ids)
    return max(len(probe) - len(plain), 0) if probe[-len(plain):] == plain else 0
