"""The edit guard: refuse a step that would break the model, whatever the algorithm.

Two checks run on every edit (:func:`shift_edit.edit`) and every applied patch
(:func:`shift_edit.apply_patch`), before the caller gets the model back:

1. **Relative norm** (before any weight is touched): for each changed matrix,
   ``||ΔW||_F / ||W||_F`` must not exceed ``max_relative_norm`` (a field of every
   algorithm's hparams, :class:`~shift_edit.algorithms.common.EditHyperParams`).
   :data:`~shift_edit.core.deltas.DEFAULT_MAX_RELATIVE_NORM` (checked by :func:`~shift_edit.core.deltas.apply_deltas`
   as it applies, :func:`~shift_edit.core.deltas.check_relative_norm`) is far above what the shipped hparams of every
   algorithm
   produce (``eval/robustness/README.md``), and far below what breaks a model.
2. **Finite outputs** (after applying): one forward pass over the edit prompts; if any logit
   is NaN or infinite the edit is undone bit-exactly and refused.

Both refusals are a one-line :class:`~shift_edit.core.errors.EditRefusedError`; ``force=True`` (CLI ``--force``)
skips the guard for people who know what they are doing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.scoring import pad_batch, pad_id_of
from .deltas import put_back
from .errors import EditRefusedError, ShiftEditError
from .requests import encode_prompt


@torch.no_grad()
def outputs_finite(model: nn.Module, tok, texts: Sequence[str], *, batch_size: int = 16) -> bool:
    """Whether every logit of every (real, unpadded) position of ``texts`` is finite."""
    device = next(model.parameters()).device
    seqs = [ids for ids in (encode_prompt(tok, t) for t in dict.fromkeys(texts)) if ids]
    for b in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[b : b + batch_size], pad_id_of(tok), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        real = logits[mask.bool()]
        if real.numel() and not bool(torch.isfinite(real).all()):
            return False
    return True


def refuse_non_finite(texts: Sequence[str]) -> EditRefusedError:
    """The one-line refusal for an edit whose outputs are not finite."""
    shown = repr(texts[0]) + (f" (and {len(texts) - 1} more)" if len(texts) > 1 else "")
    return EditRefusedError(
        f"refusing the edit: it makes the model's outputs non-finite (NaN/inf) on the edit prompt {shown}; "
        "the model is unchanged; lower the step size, or pass --force (force=True) if you mean it"
    )


def context_length(model: nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings`` / ``n_positions``), if known."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


#: The longest edit request (prompt and target, in tokens) an edit takes. An edit runs several forward
#: and backward passes over its prompt (ROME/MEMIT over context templates too), at a cost that grows
#: with the square of the length: SHIFT on SmolLM2-135M with one CPU thread takes about 7 s at 500
#: tokens and 35 s at 2,000, and gradient algorithms many times that. Edit prompts are one sentence.
MAX_EDIT_TOKENS = 2048


def check_context(model: nn.Module, tok, requests: Sequence) -> None:
    """Refuse a request whose prompt and target do not fit in the model's context, or are longer
    than :data:`MAX_EDIT_TOKENS`.

    Raises:
        ShiftEditError: naming the request's prompt, its token count and the limit.
    """
    limit = context_length(model)
    for r in requests:
        n = len(encode_prompt(tok, r.text + r.target_new))
        if n > MAX_EDIT_TOKENS and (limit is None or n <= limit):
            raise ShiftEditError(
                f"the prompt {r.text[:40]!r}... with its target is {n} tokens, more than the {MAX_EDIT_TOKENS} an edit "
                "takes (its cost grows with the square of the length; see shift_edit.core.guard.MAX_EDIT_TOKENS): "
                "edit prompts are one sentence"
            )
        if limit is not None and n > limit:
            raise ShiftEditError(
                f"the prompt {r.text[:40]!r}... with its target is {n} tokens, longer than the model's context "
                f"of {limit} tokens; shorten it"
            )


def check_outputs(model: nn.Module, tok, texts: list[str], orig: dict[str, torch.Tensor]) -> None:
    """The guard's second check: one forward pass over ``texts``; non-finite logits restore
    ``orig`` bit-exactly and raise :class:`~shift_edit.core.errors.EditRefusedError`."""
    if outputs_finite(model, tok, texts):
        return
    put_back((model.get_parameter(name), w) for name, w in orig.items())
    raise refuse_non_finite(texts)
