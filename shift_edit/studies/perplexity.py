"""WikiText perplexity, the paper's protocol: first 100 test lines of >= 30 characters,
each truncated to 256 tokens, perplexity per line, mean over lines.

Kept in one function (:func:`wikitext_perplexity`) so it can be swapped for the
benchmark harness's implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import ShiftEditError
from ..scoring import pad_batch, pad_id_of

PROTOCOL = "wikitext-2-raw-v1 test, first N non-blank lines >= 30 chars, <= 256 tokens each, mean of per-line ppl"


def load_wikitext_lines(path: str | Path, n: int = 100, min_chars: int = 30) -> list[str]:
    """The first ``n`` lines of at least ``min_chars`` characters (stripped) of a WikiText file."""
    p = Path(path)
    if not p.is_file():
        raise ShiftEditError(f"WikiText file not found: {p}")
    out = []
    with p.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if len(line) >= min_chars:
                out.append(line)
                if len(out) == n:
                    break
    return out


@torch.no_grad()
def wikitext_perplexity(
    model: nn.Module, tok, lines: Sequence[str], *, max_tokens: int = 256, batch_size: int = 8
) -> float:
    """Mean over ``lines`` of each line's perplexity (exp of its mean next-token NLL)."""
    device = next(model.parameters()).device
    encoded = [list(tok(line).input_ids)[:max_tokens] for line in lines]
    encoded = [e for e in encoded if len(e) >= 2]
    ppls = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad_id_of(tok), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(2, ids[:, 1:, None])[..., 0]
        valid = mask[:, 1:].float()
        per_line = (nll * valid).sum(1) / valid.sum(1)
        ppls.extend(math.exp(float(v)) for v in per_line)
    return sum(ppls) / len(ppls)
