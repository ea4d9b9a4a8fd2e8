"""The contexts ROME, MEMIT, AlphaEdit (and SHIFT_SUBJECT) read a fact in: short texts the model itself generates
(seeded, top-k 5) after "The", "Therefore", "Because", "I", "You", each followed by ". " and the prompt; the
request's prompt as a template; and the position of the fact token (the subject's last token by default).

:func:`prime_context_templates` samples them from the unedited model before a sequential run's first edit.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ...core.errors import ShiftEditError
from ...core.requests import EditRequest
from ...model.scoring import pad_id_of

GEN_PREFIXES = ("The", "Therefore", "Because", "I", "You")


_TEMPLATE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def context_templates(model: nn.Module, tok, length_params: Sequence[Sequence[int]], seed: int) -> list[str]:
    """``["{}", "<generated text>. {}", ...]``: contexts sampled from the model (top-k 5,
    seeded), cached per model object, lengths and seed."""
    per_model = _TEMPLATE_CACHE.setdefault(model, {})
    key = (tuple(tuple(p) for p in length_params), seed)
    if key in per_model:
        return per_model[key]
    device = next(model.parameters()).device
    out = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for new_tokens, count in length_params:
            per_prefix = [count // len(GEN_PREFIXES) + (1 if i < count % len(GEN_PREFIXES) else 0)
                          for i in range(len(GEN_PREFIXES))]
            for prefix, n in zip(GEN_PREFIXES, per_prefix):
                if n == 0:
                    continue
                ids = tok(prefix, return_tensors="pt").input_ids.to(device)
                gen = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                    top_p=1.0, temperature=1.0, max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens),
                    num_return_sequences=n, pad_token_id=pad_id_of(tok),
                )
                for row in gen:
                    text = tok.decode(row, skip_special_tokens=True)
                    text = text.replace("{", " ").replace("}", " ").strip()
                    out.append(text + ". {}")
    per_model[key] = out
    return out


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
    context_templates(model, tok, hparams.context_template_length_params, hparams.context_seed)
