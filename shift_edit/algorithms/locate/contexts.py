"""The contexts ROME, MEMIT, AlphaEdit (and SHIFT_SUBJECT) read a fact in: short texts the model itself generates
(seeded, top-k 5) after "The", "Therefore", "Because", "I", "You", each followed by ". " and the prompt; the
request's prompt as a template; and the position of the fact token (the subject's last token by default).

:func:`prime_context_templates` samples them from the unedited model before a sequential run's first edit.
"""

from __future__ import annotations

import unicodedata
import weakref
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ...core.errors import ShiftEditError
from ...core.requests import EditRequest
from ...model.scoring import pad_id_of

GEN_PREFIXES = ("The", "Therefore", "Because", "I", "You")


_TEMPLATE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def context_templates(model: nn.Module, tok, length_params: Sequence[Sequence[int]], seed: int,
                      length_mode: Literal["total", "new"] = "new") -> list[str]:
    """``["{}", "<generated text>. {}", ...]``: contexts sampled from the model (top-k 5,
    seeded with ``seed`` in a forked RNG), cached per model object, lengths, seed and mode.

    ``length_mode`` (see :class:`ReferenceLocateEditHyperParams`): ``total`` = each length counts
    the prefix's tokens too, sampled as the reference ``generate_fast``; ``new`` (the default here,
    kept for SHIFT_SUBJECT's settings) = new tokens, sampled by ``model.generate``. The templates of
    ``length_params[i]`` follow those of ``length_params[i - 1]`` (:func:`template_groups`)."""
    per_model = _TEMPLATE_CACHE.setdefault(model, {})
    key = (tuple(tuple(p) for p in length_params), seed, length_mode)
    if key in per_model:
        return per_model[key]
    device = next(model.parameters()).device
    out = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, count in length_params:
            per_prefix = _split_count(int(count))
            if length_mode == "total":
                prompts = [p for p, n in zip(GEN_PREFIXES, per_prefix) for _ in range(n)]
                out.extend(t + ". {}" for t in _sample_total_length(model, tok, prompts, int(length)))
                continue
            for prefix, n in zip(GEN_PREFIXES, per_prefix):
                if n == 0:
                    continue
                ids = tok(prefix, return_tensors="pt").input_ids.to(device)
                gen = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                    top_p=1.0, temperature=1.0, max_new_tokens=int(length), min_new_tokens=int(length),
                    num_return_sequences=n, pad_token_id=pad_id_of(tok),
                )
                for row in gen:
                    text = tok.decode(row, skip_special_tokens=True)
                    text = text.replace("{", " ").replace("}", " ").strip()
                    out.append(text + ". {}")
    per_model[key] = out
    return out


def templates_for(model: nn.Module, tok, hp) -> list[str]:
    """The context templates of ``hp`` (:func:`context_templates` with its lengths, seed and, for ROME,
    MEMIT and AlphaEdit, its ``context_length_mode``; ``new`` for hparams without that field)."""
    return context_templates(model, tok, hp.context_template_length_params, hp.context_seed,
                             getattr(hp, "context_length_mode", "new"))


def template_groups(length_params: Sequence[Sequence[int]]) -> list[int]:
    """Sizes of the context types in :func:`context_templates`' list, in order: the bare prompt, then one group
    per ``[length, count]`` entry with ``count > 0`` (MEMIT's ``compute_ks`` averages within each, then across)."""
    return [1] + [int(count) for _length, count in length_params if int(count) > 0]


def _split_count(count: int) -> list[int]:
    """``count`` generations over the prefixes, as evenly as possible (earlier prefixes get the remainder)."""
    n = len(GEN_PREFIXES)
    return [count // n + (1 if i < count % n else 0) for i in range(n)]


def _sample_total_length(model: nn.Module, tok, prompts: list[str], length: int, top_k: int = 5) -> list[str]:
    """Texts of ``length`` tokens in all (prompt included) continuing ``prompts``, sampled as the reference
    ``generate_fast`` does: the prompts right-padded into one batch; at each step one ``torch.multinomial``
    draw for every row from the top-``top_k`` softmax probabilities renormalised, kept by the rows whose text
    ends there; steps continue while the batch is narrower than ``length``. Decoded without special tokens,
    NFKD-normalised, blank lines as spaces, braces as spaces."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad = pad_id_of(tok)
    encoded = [list(tok(p).input_ids) for p in prompts]
    lens = torch.tensor([len(e) for e in encoded], device=device)
    width = int(lens.max())
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = torch.tensor(e, device=device)
    stop = int(lens.min())  # positions < stop are in every row's context
    while ids.shape[1] < length:
        mask = (torch.arange(stop, device=device)[None] < lens[:, None]).long()
        logits = model(input_ids=ids[:, :stop], attention_mask=mask, use_cache=False).logits[:, -1].float()
        probs = torch.softmax(logits, dim=1)
        top = torch.topk(probs, top_k, dim=1).indices
        top_p = torch.gather(probs, 1, top)
        top_p = top_p / top_p.sum(1)[:, None]
        new = torch.gather(top, 1, torch.multinomial(top_p, 1))[:, 0]
        if stop == ids.shape[1]:
            ids = torch.cat([ids, torch.full((len(prompts), 1), pad, dtype=torch.long, device=device)], dim=1)
        ends_here = lens == stop
        ids[ends_here, stop] = new[ends_here]
        lens = lens + ends_here.long()
        stop += 1
    texts = [tok.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(ids, lens.tolist())]
    return [unicodedata.normalize("NFKD", t).replace("\n\n", " ").replace("<|endoftext|>", "")
            .replace("{", " ").replace("}", " ") for t in texts]


def prompt_template(req: EditRequest) -> str:
    """The request's prompt with ``{}`` where the subject goes."""
    if "{}" in req.prompt:
        return req.prompt
    if not req.subject or req.subject not in req.prompt:
        raise ShiftEditError(f"ROME/MEMIT need the subject in the prompt (request {req.prompt!r})")
    i = req.prompt.index(req.subject)
    return req.prompt[:i] + "{}" + req.prompt[i + len(req.subject):]


def encode_with_fact_index(tok, template: str, subject: str, fact_token: str) -> tuple[list[int], int]:
    """Token ids of ``template.format(subject)`` and the index of the fact token."""
    text = template.replace("{}", subject, 1)
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    if fact_token == "last":
        return ids, len(ids) - 1
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise ShiftEditError("ROME/MEMIT need a fast tokenizer (offset mapping) to find the subject")
    start = template.index("{}")
    end = start + len(subject)
    real = [(i, a, b) for i, (a, b) in enumerate(offsets) if b > a]
    if fact_token == "subject_last":
        cands = [i for i, a, _b in real if a < end]
        return ids, cands[-1]
    cands = [i for i, _a, b in real if b > start]
    return ids, cands[0]


def prime_context_templates(model: nn.Module, tok, hparams) -> None:
    """Sample (and cache for ``model``) the context templates ``hparams`` asks for, from the model as it is
    (the ``prime`` of ROME, MEMIT and AlphaEdit: a sequential run calls it before its first edit)."""
    templates_for(model, tok, hparams)
