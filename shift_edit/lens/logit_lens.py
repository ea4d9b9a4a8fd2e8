"""The Logit Lens of a vector: the model's final norm, then the decoding matrix, then softmax.

Plain lens: ``softmax(E · norm_f(v))``. Normalised lens (appendix F style): the vector is
scaled to unit norm *before* the final norm (so a tiny gradient is not swamped by the
norm's epsilon or a LayerNorm bias) and the decoding rows are scaled to unit norm (so
tokens with long embedding rows do not dominate); its ranking is a cosine ranking.

For FF1 read the *most* probable tokens of x_i; for FF2 read the *least* probable tokens
of δ_i: the update subtracts the gradient, which flips the ranking (section 5.2).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..model.architectures import ModelAdapter

Order = Literal["top", "bottom"]


class LogitLens:
    """Project ``d_model`` vectors of one model into its vocabulary.

    Args:
        model: the causal LM.
        adapter: its :class:`ModelAdapter` (built from the architecture table if omitted).
        apply_final_norm: apply the model's final norm before the decoding matrix (default).
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter | None = None, *, apply_final_norm: bool = True) -> None:
        self.adapter = adapter or ModelAdapter(model)
        self.norm = self.adapter.final_norm() if apply_final_norm else None
        self.decoding = self.adapter.decoding_matrix().detach()
        self._unit_rows: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.decoding.shape[0])

    def _unit_decoding(self) -> torch.Tensor:
        if self._unit_rows is None:
            d = self.decoding.float()
            self._unit_rows = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self._unit_rows

    @torch.no_grad()
    def logits(self, vectors: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Lens logits ``[..., vocab]`` (float32) of ``vectors`` ``[..., d_model]``."""
        v = vectors.detach().to(self.decoding.device).float()
        if normalized:
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        if self.norm is not None:
            ref = next(self.norm.parameters(), None)
            v = self.norm(v.to(ref.dtype) if ref is not None else v).float()
        if normalized:
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            return v @ self._unit_decoding().T
        return v @ self.decoding.float().T

    def probs(self, vectors: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Softmax of :meth:`logits`."""
        return self.logits(vectors, normalized=normalized).softmax(-1)

    def tokens(
        self, vector: torch.Tensor, k: int = 5, *, order: Order = "top", normalized: bool = False
    ) -> list[tuple[int, float]]:
        """The ``k`` most (``"top"``) or least (``"bottom"``) probable token ids with their probabilities."""
        p = self.probs(vector.reshape(-1), normalized=normalized)
        values, ids = p.topk(min(k, p.numel()), largest=(order == "top"))
        return [(int(i), float(v)) for v, i in zip(values, ids)]

    def rank(self, vectors: torch.Tensor, token_id: int, *, order: Order = "top",
             normalized: bool = False) -> torch.Tensor:
        """1-based rank of ``token_id`` per vector: 1 = most probable (``top``) or least probable (``bottom``)."""
        return rank_in_logits(self.logits(vectors, normalized=normalized), token_id, order=order)


def rank_in_logits(logits: torch.Tensor, token_id: int, *, order: Order = "top") -> torch.Tensor:
    """1-based rank of ``token_id`` in each row of ``logits`` (ties count in its favour)."""
    own = logits[..., token_id : token_id + 1]
    beats = logits > own if order == "top" else logits < own
    return beats.sum(-1) + 1


def decode_token(tok, token_id: int) -> str:
    """A token id as readable text (byte-level markers decoded)."""
    return tok.decode([int(token_id)])
