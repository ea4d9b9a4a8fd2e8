"""Pieces every editing algorithm shares: common hparams and the skip rule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from torch import nn

from ..core.deltas import DEFAULT_MAX_RELATIVE_NORM
from ..core.hparams import HyperParams
from ..core.requests import EditRequest, encode_prompt, encode_target
from ..model.architectures import ModelAdapter
from ..model.scoring import pad_id_of, score_token_continuations


@dataclasses.dataclass(kw_only=True)
class EditHyperParams(HyperParams):
    """Fields every editing algorithm has.

    Attributes:
        layers: the layers whose matrices are edited (negative counts from the end).
        model_name: the model these hparams were chosen for (hub id, path or alias).
        skip_if_predicted: leave a request alone when its target is already the strict
            top-1 prediction (every target token the argmax under teacher forcing).
        ff2_template / ff1_templates / final_norm: explicit module paths, for models
            whose type is not in the architecture table (``{}`` is the layer index).
        max_relative_norm: the edit guard's bound on ``||ΔW||_F / ||W||_F`` of each changed
            matrix (:mod:`shift_edit.core.guard`); ``null`` for no bound. The default is far above
            what the shipped hparams produce (eval/robustness/README.md).
    """

    layers: list[int]
    model_name: str = ""
    skip_if_predicted: bool = True
    ff2_template: str | None = None
    ff1_templates: list[str] | None = None
    final_norm: str | None = None
    max_relative_norm: float | None = DEFAULT_MAX_RELATIVE_NORM

    def validate(self) -> None:
        super().validate()
        bound = self.max_relative_norm
        if bound is not None and (not math.isfinite(bound) or bound <= 0):
            self._fail("max_relative_norm", bound, "it must be a finite number > 0, or null for no bound")
        if not self.layers:
            self._fail("layers", self.layers, "give at least one layer index")
        if len(set(self.layers)) != len(self.layers):
            self._fail("layers", self.layers, "each layer may appear once")


def adapter_for(model: nn.Module, hparams: EditHyperParams) -> ModelAdapter:
    """The model's adapter, with the hparams' explicit module templates if any."""
    adapter = ModelAdapter(
        model,
        ff2_template=hparams.ff2_template,
        ff1_templates=hparams.ff1_templates,
        final_norm=hparams.final_norm,
    )
    for layer in hparams.layers:
        adapter.check_layer(layer)
    return adapter


def tokenize_requests(tok, requests: Sequence[EditRequest]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target_new ids) for each request."""
    return [(encode_prompt(tok, r.text), encode_target(tok, r.text, r.target_new)) for r in requests]


def already_predicted(
    model: nn.Module, tok, requests: Sequence[EditRequest], *, batch_size: int = 32
) -> list[bool]:
    """Per request: is target_new already the strict top-1 prediction?"""
    scores = score_token_continuations(
        model, tokenize_requests(tok, requests), pad_id=pad_id_of(tok), batch_size=batch_size
    )
    return [s.all_correct for s in scores]
