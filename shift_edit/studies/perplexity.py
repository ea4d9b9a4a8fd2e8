"""WikiText perplexity, the paper's protocol: first 100 test lines of >= 30 characters,
each truncated to 256 tokens, perplexity per line, mean over lines.

The computation is the benchmark harness's (:func:`shift_edit.bench.wikitext.perplexity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..bench.wikitext import PerplexityProtocol, long_lines, perplexity, read_wikitext_lines
from ..core.errors import ShiftEditError


def protocol_text(n_lines: int, max_tokens: int) -> str:
    """The perplexity protocol in words, for result files."""
    return (f"wikitext-2-raw-v1 test, first {n_lines} lines of >= 30 chars, each truncated to {max_tokens} tokens, "
            "mean of per-line ppl")


def load_wikitext_lines(path: str | Path, n: int = 100, min_chars: int = 30) -> list[str]:
    """The first ``n`` non-blank lines of at least ``min_chars`` characters of a WikiText file,
    stripped (read by the package's one reader, :func:`shift_edit.bench.wikitext.read_wikitext_lines`)."""
    p = Path(path)
    if not p.is_file():
        raise ShiftEditError(f"WikiText file not found: {p}")
    return long_lines(read_wikitext_lines(p), n, min_chars, strip=True)


def wikitext_perplexity(
    model: nn.Module, tok, lines: Sequence[str], *, max_tokens: int = 256, batch_size: int = 1
) -> float:
    """Mean over ``lines`` of each line's perplexity (exp of its mean next-token NLL): the
    benchmark's ``paper`` protocol (:func:`shift_edit.bench.wikitext.perplexity`) on these lines."""
    protocol = PerplexityProtocol(name="paper", n_lines=len(lines), min_chars=0, max_tokens=max_tokens)
    return perplexity(model, tok, lines, protocol, batch_size=batch_size)
