"""A sample of generic MLP inputs: the inputs of given layers on about ``n_tokens`` tokens of the statistics'
corpus (after the tokens the statistics read, so that the sample is not their own), cached beside the statistics
under the unedited model's fingerprint (SHIFT_NEURON's and SHIFT_SUBJECT's gates must stay silent on it)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ShiftEditError
from ..files.io import read_verified, write_verified
from .architectures import ModelAdapter
from .corpus import open_corpus, token_batches
from .covariance import cache_paths, expected_meta
from .hooks import capture_inputs
from .stats_pinning import on_weights, statistics_fingerprint

log = logging.getLogger(__name__)


def generic_sample(
    model: nn.Module,
    tok,
    layers: Sequence[int],
    *,
    corpus: str | None = None,
    skip_tokens: int = 0,
    n_tokens: int = 20_000,
    max_length: int = 256,
    adapter: ModelAdapter | None = None,
    use_cache: bool = True,
) -> dict[int, torch.Tensor]:
    """The MLP inputs (float32 ``[n, d]``) of about ``n_tokens`` generic tokens at each of ``layers``: the
    corpus's texts (truncated to ``max_length`` tokens) that end after its first ``skip_tokens`` tokens (e.g. the
    tokens :func:`layer_stats` read, so that the sample is not the statistics' own), up to ``skip_tokens +
    n_tokens`` tokens in all. Cached beside the statistics, under the same model fingerprint (pinned with
    :func:`pinned_statistics`)."""
    if n_tokens < 1 or max_length < 1 or skip_tokens < 0:
        raise ShiftEditError(f"n_tokens ({n_tokens}), max_length ({max_length}) must be >= 1, skip_tokens "
                             f"({skip_tokens}) >= 0")
    adapter = adapter or ModelAdapter(model)
    layers = sorted({adapter.check_layer(layer) for layer in layers})
    src = open_corpus(corpus)
    fingerprint = statistics_fingerprint(model)
    site = f"ff1sample-skip{skip_tokens}"
    out: dict[int, torch.Tensor] = {}
    todo: dict[int, tuple[Path, Path, dict]] = {}
    for layer in layers:
        pt, meta_path = cache_paths(fingerprint, src, layer, n_tokens, max_length, "float32", site)
        expected = {**expected_meta(fingerprint, src, layer, adapter.ff1_names(layer)[0], n_tokens, max_length,
                                     "float32"), "skip_tokens": skip_tokens}
        hit = _load_sample(pt, meta_path, expected) if use_cache else None
        if hit is not None:
            out[layer] = hit
        else:
            todo[layer] = (pt, meta_path, expected)
    if todo:
        names = {adapter.ff1_names(layer)[0]: layer for layer in todo}
        got: dict[int, list[torch.Tensor]] = {layer: [] for layer in todo}
        device = next(model.parameters()).device
        seen = 0
        with torch.no_grad(), on_weights(model, fingerprint, f"the generic sample of layers {sorted(todo)}"):
            for batch in token_batches(tok, src, skip_tokens + n_tokens, max_length, 2048):
                for ids in batch:
                    seen += len(ids)
                    if seen <= skip_tokens:  # a text wholly among the skipped tokens
                        continue
                    with capture_inputs(model, list(names)) as cap:
                        model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                    for name, layer in names.items():
                        got[layer].append(cap.inputs[name].reshape(len(ids), -1).float().cpu())
        if seen <= skip_tokens:
            raise ShiftEditError(f"the corpus {src.name} has {seen} tokens (texts of at most {max_length}), none "
                                 f"after the first {skip_tokens} (the statistics' own): no generic sample; use a "
                                 "longer corpus or fewer statistics tokens")
        for layer, (pt, meta_path, expected) in todo.items():
            sample = torch.cat(got[layer])
            out[layer] = sample
            if use_cache:
                write_verified(pt, meta_path, {"sample": sample.contiguous()}, {**expected, "tokens": len(sample)})
    return out


def _load_sample(pt: Path, meta_path: Path, expected: dict[str, Any]) -> torch.Tensor | None:
    read = read_verified(pt, meta_path, expected, "generic sample cache")
    if read is None:
        return None
    sample = read[1].get("sample")
    if not isinstance(sample, torch.Tensor) or sample.dim() != 2 or not torch.isfinite(sample).all():
        log.warning("generic sample cache %s holds a bad tensor; rebuilding", pt)
        return None
    return sample
