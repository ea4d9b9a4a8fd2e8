"""WikiText perplexity: the protocols (``paper``: mean of per-line perplexities; ``standard``:
sliding windows) and the one WikiText reader of the package."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ShiftEditError
from ..core.requests import encode_prompt
from ..model.scoring import pad_batch, pad_id_of


@dataclass(frozen=True)
class PerplexityProtocol:
    """How WikiText perplexity is computed.

    ``paper``: the first ``n_lines`` test lines with at least ``min_chars`` characters
    (after stripping), each truncated to ``max_tokens`` tokens; the mean of per-line
    perplexities (Backward Lens / ROME-style). ``standard``: the non-blank lines joined
    with newlines into one text, scored with windows of ``window`` tokens moved by
    ``stride`` (only the new tokens of each window count); exp of the token-weighted mean NLL.
    """

    name: str = "paper"
    n_lines: int = 100
    min_chars: int = 30
    max_tokens: int = 256
    window: int = 1024
    stride: int = 512

    def to_dict(self) -> dict:
        if self.name == "paper":
            return {"name": "paper", "n_lines": self.n_lines, "min_chars": self.min_chars,
                    "max_tokens": self.max_tokens}
        return {"name": "standard", "window": self.window, "stride": self.stride}


def read_wikitext_lines(path: str | Path | None = None) -> list[str]:
    """Non-blank WikiText-2 raw test lines, as they are in the file (leading spaces kept), from a
    local text file or (``path=None``) via ``datasets``: the one WikiText reader of the package."""
    if path is not None:
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ShiftEditError(f"cannot read WikiText file {path}: {exc}") from None
        lines = text.replace("\r\n", "\n").split("\n")
    else:  # pragma: no cover - needs internet
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        lines = [t.rstrip("\n") for t in ds["text"]]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise ShiftEditError(f"WikiText source {path or 'datasets'} has no text")
    return lines


def long_lines(lines: Sequence[str], n: int, min_chars: int, *, strip: bool = False) -> list[str]:
    """The first ``n`` lines with at least ``min_chars`` characters once stripped (the paper
    protocol's selection); ``strip`` returns them stripped."""
    return [s if strip else ln for ln in lines if len(s := ln.strip()) >= min_chars][:n]


@torch.no_grad()
def perplexity(model: nn.Module, tok, lines: Sequence[str], protocol: PerplexityProtocol, *,
               batch_size: int = 1) -> float:
    """WikiText perplexity under ``protocol`` (see :class:`PerplexityProtocol`).

    ``batch_size`` lines per forward pass (paper protocol): the logits of a batch are
    ``batch_size x 256 x vocab`` floats (50 MB a line for SmolLM2's 49k vocabulary), so the
    default of one line keeps the benchmark's peak memory near the model's size.
    """
    device = next(model.parameters()).device
    if protocol.name == "paper":
        chosen = long_lines(lines, protocol.n_lines, protocol.min_chars)
        seqs = [encode_prompt(tok, ln)[: protocol.max_tokens] for ln in chosen]
        seqs = [s for s in seqs if len(s) >= 2]
        ppls = []
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            ids, mask = pad_batch(chunk, pad_id_of(tok), device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            # log p(next) = logit - logsumexp: no second [batch, len, vocab] tensor
            logp = logits.gather(-1, ids[:, 1:, None])[..., 0] - torch.logsumexp(logits, -1)
            del logits
            m = mask[:, 1:].float()
            nll = -(logp * m).sum(1) / m.sum(1)
            ppls.extend(torch.exp(nll).tolist())
        return float(sum(ppls) / len(ppls))
    if protocol.name == "standard":
        ids = encode_prompt(tok, "\n".join(lines))
        max_pos = getattr(model.config, "max_position_embeddings", None) or protocol.window
        window = min(protocol.window, int(max_pos))
        stride = min(protocol.stride, window)
        total, count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            chunk = torch.tensor([ids[begin:end]], device=device)
            logits = model(input_ids=chunk, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, chunk[0, 1:, None])[:, 0]
            new_from = max(prev_end - begin, 0)  # targets at positions >= prev_end are new
            sel = logp[max(new_from - 1, 0) :]
            total += float(-sel.sum())
            count += sel.numel()
            prev_end = end
            if end == len(ids):
                break
        return float(math.exp(total / count))
    raise ValueError(f"unknown perplexity protocol {protocol.name!r}")
