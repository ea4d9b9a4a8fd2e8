"""ROME's generation protocol (top-k sampling, several records per decoding batch with each
record's edit hooked onto its own rows) and its n-gram entropy (metric family ``generation``)."""

from __future__ import annotations

import contextlib
import inspect
import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.requests import encode_prompt
from ..model.hooks import head_only_at, owned_hooks
from ..model.scoring import pad_batch, pad_id_of


def word_tokens(text: str) -> list[str]:
    """nltk's word tokenizer (:class:`nltk.tokenize.NLTKWordTokenizer`) on the whole text.

    ROME calls ``nltk.word_tokenize``, which first splits sentences with the punkt model
    (a data download) and then runs ``NLTKWordTokenizer`` on each sentence. We run that
    same word tokenizer on the whole text (``word_tokenize(text, preserve_line=True)``), so
    no download is needed. The only difference is a period that ends a sentence inside the
    text: punkt splits it off as its own token, the word tokenizer alone only does so at
    the end of the text.
    """
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize(text)


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return float(-sum((c / total) * math.log2(c / total) for c in counts.values()))


def text_ngram_entropy(text: str) -> float:
    """ROME's per-text n-gram entropy: mean(2/3 * H2, 4/3 * H3), H_n in bits over word n-grams."""
    toks = word_tokens(text)
    hs = []
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        hs.append(w * _entropy_bits(grams))
    return float(sum(hs) / len(hs))


def ngram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`text_ngram_entropy` over texts (ROME's ``n_gram_entropy``)."""
    return float(sum(text_ngram_entropy(t) for t in texts) / len(texts))


@torch.no_grad()
def generate_topk(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """ROME's generation protocol: top-k sampling until ``max_length`` tokens in total
    (prompt included, no stop at EOS), batched with left padding and a KV cache.

    Returns the decoded full texts (prompt + continuation), NFKD-normalised with blank
    lines turned into spaces. Deterministic for a given seed, prompts and batch.
    """
    return generate_topk_groups(model, tok, [GenerationGroup(list(prompts), seed)], max_length=max_length,
                                top_k=top_k)[0]


def cache_keyword(model: nn.Module) -> str:
    """The KV cache's argument name: ``cache`` in current transformers, ``past_key_values`` before
    (and deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class GenerationGroup:
    """One record's generation: its prompts, its sampling seed, and the edit to apply to its
    rows only (``deltas``: :class:`~shift_edit.core.deltas.WeightDelta` s; empty = the model as is)."""

    prompts: list[str]
    seed: int
    deltas: list = field(default_factory=list)


def grouped_prompts(tok, groups: Sequence) -> tuple[list[list[int]], list[slice]]:
    """The token ids of every group's prompts, in order, and each group's slice of those rows (``groups``: objects
    with a ``prompts`` sequence)."""
    seqs = [encode_prompt(tok, p) for g in groups for p in g.prompts]
    rows, at = [], 0
    for g in groups:
        rows.append(slice(at, at + len(g.prompts)))
        at += len(g.prompts)
    return seqs, rows


@contextlib.contextmanager
def _row_deltas(model: nn.Module, groups: Sequence[GenerationGroup], rows: Sequence[slice], batch: int):
    """Forward hooks that add each group's weight deltas to its own rows' module outputs:
    ``y_rows += x_rows @ ΔWᵀ`` (low rank: ``(x_rows @ rightᵀ) @ leftᵀ``), so records edited
    differently share one decoding batch."""
    by_module: dict[str, list[tuple[slice, object]]] = {}
    for g, sl in zip(groups, rows):
        for d in g.deltas:
            by_module.setdefault(d.module, []).append((sl, d))

    def make(entries):
        def hook(_module, args, output):
            x = args[0]
            flat = output.dim() == 2  # OPT flattens [batch, seq, d] inside its MLP
            y = output.view(batch, -1, output.shape[-1]) if flat else output
            xv = x.view(batch, -1, x.shape[-1]) if flat else x
            y = y.clone()
            for sl, d in entries:
                xr = xv[sl].to(torch.float32)
                if d.dense is not None:
                    add = xr @ d.dense.to(xr.device).T
                else:
                    add = (xr @ d.right.to(xr.device).T) @ d.left.to(xr.device).T
                y[sl] = y[sl] + add.to(y.dtype)
            return y.view_as(output) if flat else y

        return hook

    with owned_hooks() as hooks:
        for name, entries in by_module.items():
            hooks.forward_hook(model.get_submodule(name), make(entries))
        yield


@torch.no_grad()
def generate_topk_groups(
    model: nn.Module,
    tok,
    groups: Sequence[GenerationGroup],
    *,
    max_length: int = 100,
    top_k: int = 5,
) -> list[list[str]]:
    """:func:`generate_topk` for several records in one decoding batch.

    Each group's rows see the model plus that group's deltas (added to those rows' module
    outputs by hooks) and draw from the group's own seeded generator, so a group's texts do
    not depend on the other groups' sampling. Decoding on a CPU is bound by reading the
    weights once per step, so a batch of several records costs little more than one.
    """
    device = next(model.parameters()).device
    seqs, rows = grouped_prompts(tok, groups)
    ids, mask = pad_batch(seqs, pad_id_of(tok), device, left=True)
    gens = [torch.Generator(device="cpu").manual_seed(int(g.seed)) for g in groups]
    # as for one record alone: a record's rows all get max_length minus its longest prompt new tokens
    n_new_of = [max(0, max_length - max(len(seqs[i]) for i in range(sl.start, sl.stop))) for sl in rows]
    n_new = max(n_new_of)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = [list(s) for s in seqs]
    past = None
    step_ids, step_pos = ids, pos
    cache_kw = cache_keyword(model)
    with _row_deltas(model, groups, rows, len(seqs)):
        for _ in range(n_new):
            # the head runs at the last position only (the prompt step would otherwise make
            # [rows, prompt length, vocab] logits)
            with head_only_at(model, tuple(step_ids.shape), [[step_ids.shape[1] - 1]] * len(seqs)) as gather:
                res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                            **{cache_kw: past})
                logits = torch.cat(gather(res.logits)).cpu()
            past = res[cache_kw] if cache_kw in res.keys() else None
            vals, idx = logits.topk(top_k, dim=-1)
            probs = vals.softmax(-1)
            choice = torch.cat([torch.multinomial(probs[sl], 1, generator=g) for sl, g in zip(rows, gens)])
            nxt = idx.gather(1, choice)
            for row, t in zip(out, nxt[:, 0].tolist()):
                row.append(t)
            step_ids = nxt.to(device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    for sl, k in zip(rows, n_new_of):  # tokens past a record's own length are dropped (drawn later: no effect)
        for i in range(sl.start, sl.stop):
            out[i] = out[i][: len(seqs[i]) + k]
    texts = [unicodedata.normalize("NFKD", tok.decode(r, skip_special_tokens=True)).replace("\n\n", " ") for r in out]
    return [texts[sl] for sl in rows]
