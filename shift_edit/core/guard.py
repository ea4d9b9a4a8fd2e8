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
   is NaN or infinite the edit is undone bit-exactly and refused. When the algorithm recorded the unedited
   model's block inputs over the edit prompts (:class:`PromptInputs`), the pass starts at the first block the
   edit changed (the blocks below it compute what they computed before).

Both refusals are a one-line :class:`~shift_edit.core.errors.EditRefusedError`; ``force=True`` (CLI ``--force``)
skips the guard for people who know what they are doing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.architectures import ModelAdapter
from ..model.resume import resume_at
from ..model.scoring import pad_batch, pad_id_of
from .deltas import put_back
from .errors import EditRefusedError, ShiftEditError
from .requests import encode_prompt


@dataclass
class PromptInputs:
    """Decoder blocks' inputs over the edit prompts on the model as an algorithm got it (recorded by its own pass):
    ``blocks[block][text]`` is ``[n_tokens, d]`` over ``encode_prompt(tok, text)``. With them, the guard's pass
    re-runs only the blocks from the first one an edit changed."""

    adapter: ModelAdapter
    blocks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def add(self, block: int, text: str, hidden: torch.Tensor) -> None:
        """Keep block ``block``'s input over ``text`` (``[n_tokens, d]``, copied)."""
        self.blocks.setdefault(block, {})[text] = hidden.detach().clone()

    def start(self, block: int | None, texts: Sequence[str]
              ) -> tuple[ModelAdapter, int, Mapping[str, torch.Tensor]] | None:
        """:func:`outputs_finite`'s ``start`` for a pass over ``texts`` from ``block``, if every text's input there
        is kept."""
        kept = self.blocks.get(block) if block is not None else None
        if not kept or any(t not in kept for t in texts):
            return None
        return self.adapter, block, kept


@torch.no_grad()
def outputs_finite(model: nn.Module, tok, texts: Sequence[str], *, batch_size: int = 16,
                   start: tuple[ModelAdapter, int, Mapping[str, torch.Tensor]] | None = None) -> bool:
    """Whether every logit of every (real, unpadded) position of ``texts`` is finite. With ``start``
    ``(adapter, block, inputs)`` the pass begins at ``block``, fed ``inputs[text]`` (``[n_tokens, d]``: its input
    over the text, from a model whose blocks below ``block`` are those of ``model``)."""
    device = next(model.parameters()).device
    encoded = {t: ids for t in dict.fromkeys(texts) if (ids := encode_prompt(tok, t))}  # each text encoded once
    unique = list(encoded)
    for b in range(0, len(unique), batch_size):
        chunk = unique[b : b + batch_size]
        ids, mask = pad_batch([encoded[t] for t in chunk], pad_id_of(tok), device)
        if start is None:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        else:
            adapter, block, inputs = start
            hidden = torch.zeros(*ids.shape, inputs[chunk[0]].shape[-1], dtype=inputs[chunk[0]].dtype, device=device)
            for r, t in enumerate(chunk):
                hidden[r, : len(inputs[t])] = inputs[t].to(device)
            with resume_at(adapter, block, hidden):
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


def check_outputs(model: nn.Module, tok, texts: list[str], orig: dict[str, torch.Tensor],
                  start: tuple[ModelAdapter, int, Mapping[str, torch.Tensor]] | None = None) -> None:
    """The guard's second check: one forward pass over ``texts`` (from ``start``, as in :func:`outputs_finite`);
    non-finite logits restore ``orig`` bit-exactly and raise :class:`~shift_edit.core.errors.EditRefusedError`."""
    if outputs_finite(model, tok, texts, start=start):
        return
    put_back((model.get_parameter(name), w) for name, w in orig.items())
    raise refuse_non_finite(texts)
