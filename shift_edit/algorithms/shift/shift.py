"""Forward pass shift (Katz et al., 2024): one forward pass, no backward pass.

For each request, run the prompt, take x_n = FF2's input at the last prompt
token and D[t] = the decoding-matrix row of the target's first token, and add
``eta * outer(x_n, D[t])`` to FF2, oriented to its weight layout. In the
canonical ``[out, in]`` orientation the delta is the rank-one ``D[t] (eta x_n)ᵀ``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ...core.deltas import WeightDelta
from ...core.guard import PromptInputs
from ...core.registry import Computed, register, tag_layers, tag_value
from ...core.requests import EditRequest
from ...model.hooks import forward_capture
from ...model.resume import record_block_inputs
from ...model.scoring import pad_batch, pad_id_of
from ..common import EditHyperParams, adapter_for, tokenize_requests


@dataclasses.dataclass(kw_only=True)
class ShiftHyperParams(EditHyperParams):
    """Hparams of the forward pass shift.

    Attributes:
        eta: step size. With ``eta_scaling="raw"`` (the paper) the delta is
            ``eta * outer(x_n, D[t])``; with ``"normalized"`` eta is divided by
            ``||x_n||²``, so ``eta`` is the push ``eta_raw * ||x_n||²`` and comparable
            across layers and prompts.
        d_source: where D[t] comes from: ``"decoding"`` (the unembedding, default),
            ``"input_embedding"`` (the authors' code: GPT-2's ``wte``), or ``"centered"``
            (the decoding row minus the mean decoding row).
        target_tokens: ``"first"`` (the paper) or ``"all"``: one term per target token,
            x taken at the position that predicts it under teacher forcing.
        early_exit: stop the forward pass after the deepest edited layer when the logits
            are not needed (only when ``skip_if_predicted`` is off).
        batch_size: requests per forward pass.
    """

    ALG_NAME = "SHIFT"
    STEP_FIELD = "eta"

    eta: float
    eta_scaling: Literal["raw", "normalized"] = "raw"
    d_source: Literal["decoding", "input_embedding", "centered"] = "decoding"
    target_tokens: Literal["first", "all"] = "first"
    early_exit: bool = True
    batch_size: int = 16

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.eta) or self.eta <= 0:
            self._fail("eta", self.eta, "it must be a finite number > 0")
        if self.batch_size < 1:
            self._fail("batch_size", self.batch_size, "it must be >= 1")


def _d_rows(adapter, source: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if source == "input_embedding":
        return adapter.input_embedding(), None
    dmat = adapter.decoding_matrix()
    mean = dmat.detach().mean(0, dtype=torch.float32) if source == "centered" else None
    return dmat, mean


@torch.no_grad()
def compute_shift(model: nn.Module, tok, requests: list[EditRequest], hparams: ShiftHyperParams) -> Computed:
    """Deltas of the forward pass shift, computed against ``model`` as it is (not modified)."""
    adapter = adapter_for(model, hparams)
    layers = sorted(adapter.check_layer(layer) for layer in hparams.layers)
    names = [adapter.ff2_name(layer) for layer in layers]
    layouts = [adapter.layout(adapter.module(n)) for n in names]
    dmat, dmean = _d_rows(adapter, hparams.d_source)
    need_logits = hparams.skip_if_predicted
    teacher = need_logits or hparams.target_tokens == "all"
    stop_after = None if need_logits or not hparams.early_exit else names[-1]
    device = next(model.parameters()).device
    pairs = tokenize_requests(tok, requests)

    deltas: list[WeightDelta] = []
    skipped: list[bool] = []
    info: list[dict] = []
    kept = PromptInputs(adapter)
    for start in range(0, len(pairs), hparams.batch_size):
        chunk = pairs[start : start + hparams.batch_size]
        seqs = [p + t[:-1] if teacher else p for p, t in chunk]
        ids, mask = pad_batch(seqs, pad_id_of(tok), device)
        # the skip check reads the logits at the target positions only: the head runs there alone
        at = [list(range(len(p) - 1, len(p) - 1 + len(t))) for p, t in chunk] if need_logits else None
        with record_block_inputs(adapter) as blocks_in:
            captured, logits = forward_capture(model, ids, mask, names, stop_after=stop_after, head_positions=at)
        for row, (p, t) in enumerate(chunk):
            for layer in layers[:1]:  # the guard's pass over the prompt starts at the first edited block
                kept.add(layer, requests[start + row].text, blocks_in[layer][row, : len(p)])
            if need_logits and bool((logits[row].argmax(-1).cpu() == torch.tensor(t)).all()):
                skipped.append(True)
                info.append({"target_ids": t})
                continue
            skipped.append(False)
            n_tok = 1 if hparams.target_tokens == "first" else len(t)
            positions = list(range(len(p) - 1, len(p) - 1 + n_tok))
            d_rows = dmat[t[:n_tok]].float()
            if dmean is not None:
                d_rows = d_rows - dmean
            row_info: dict = {"target_ids": t, "layers": {}}
            for layer, name, layout in zip(layers, names, layouts):
                x = captured.inputs[name][row, positions].float()  # [n_tok, d_in]
                sq = (x.double() ** 2).sum(-1)
                eta = torch.full_like(sq, hparams.eta)
                if hparams.eta_scaling == "normalized":
                    eta = eta / sq
                deltas.append(
                    WeightDelta(
                        name, layout,
                        left=d_rows.T.contiguous().cpu(),
                        right=(eta[:, None] * x.double()).float().cpu(),
                        layer=layer,
                    )
                )
                row_info["layers"][layer] = {
                    "x_norm": [float(v) for v in sq.sqrt()],
                    "eta": [float(v) for v in eta],
                    "push": [float(v) for v in eta * sq],
                }
            info.append(row_info)
    return Computed(WeightDelta.merge(deltas), skipped, info, prompt_inputs=kept)


def describe_shift(hp: Mapping[str, Any]) -> list[str]:
    """Run tags: the layers and eta (``normalized`` when scaled by ``||x_n||^2``)."""
    normalized = " normalized" if hp.get("eta_scaling") == "normalized" else ""
    return tag_layers(hp) + tag_value(hp, "eta", suffix=normalized)


register("SHIFT", ShiftHyperParams, compute_shift,
         "forward pass shift (Backward Lens): one forward pass, rank one per request",
         linear_step=True, cli_options={"eta_scaling": "raw (paper) or normalized by ||x_n||^2"},
         describe=describe_shift)
