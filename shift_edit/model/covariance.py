"""Second-moment statistics of FF2 (or FF1) inputs, computed offline from a text corpus and cached.

ROME and MEMIT need ``C = E[k kᵀ]``, the uncentred second moment of the keys ``k``
(the inputs of the MLP output matrix FF2) at a layer. :func:`layer_stats` computes it
for several layers in one streaming pass over a corpus: every text (one line of a
local file, or one record of a ``datasets`` dataset) is tokenised, truncated to
``max_length`` tokens, and every non-padding token contributes one key vector, until
``n_tokens`` keys have been seen. Memory is bounded by one batch plus one
``[d_in, d_in]`` accumulator per layer.

What a "sample" is here: one **token** vector. ROME's published statistics use
100,000 Wikipedia *articles* (tens of millions of token vectors); ours count tokens
explicitly so the cost and the quality are visible.

Results are cached under ``cache_dir()/stats/<model fingerprint>/`` with a JSON
metadata file recording the corpus identity (name and sha256), the number of tokens
and texts, the truncation length, the dtype, the sha256 of the tensor file and its own
(:func:`shift_edit.files.io.write_verified`). A cache entry whose metadata does not match the
request, or that fails a checksum, is rebuilt with one warning, never used.

The fingerprint is the unedited model's (:func:`~shift_edit.model.stats_pinning.statistics_fingerprint`):
statistics are computed once, before a model's first edit, and pinned for every later edit of it
(:func:`~shift_edit.model.stats_pinning.pinned_statistics` says why). The corpus is :mod:`.corpus`; the sample of
generic inputs cached beside the statistics is :mod:`.generic_sample`.

``site="ff1"`` gives the same statistics of the MLP's *input* (what FF1 reads), with its mean
``E[h]`` as well (SHIFT_NEURON's neuron keys need the mean and the covariance of generic text).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ShiftEditError
from ..files.io import read_verified, write_verified
from .architectures import ModelAdapter
from .corpus import Corpus, open_corpus, token_batches
from .hooks import capture_inputs
from .loading import cache_dir
from .stats_pinning import on_weights, statistics_fingerprint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_FORMAT_VERSION = 1


@dataclass
class SecondMoment:
    """``C = E[k kᵀ]`` of FF2 (or FF1) inputs at one layer, with how it was computed.

    Attributes:
        layer: the layer index.
        mom2: the ``[d_in, d_in]`` matrix (sum of ``k kᵀ`` divided by ``n_tokens``).
        meta: corpus identity, token and text counts, truncation length, dtype, model
            fingerprint, module name.
        mean: ``E[k]`` ``[d_in]`` (entries computed or cached with it; always for ``site="ff1"``).
    """

    layer: int
    mom2: torch.Tensor
    meta: dict[str, Any]
    mean: torch.Tensor | None = None
    _factor: tuple[bool, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ rhs`` in float64 (``rhs``: ``[d_in]`` or ``[d_in, n]``), from a Cholesky factor
        computed once per object (a general solve if ``C`` is not positive definite)."""
        rhs64 = rhs.double().cpu()
        vec = rhs64.ndim == 1
        cols = rhs64[:, None] if vec else rhs64
        if self._factor is None:
            factor, info = torch.linalg.cholesky_ex(self.mom2.double())
            self._factor = (True, factor) if int(info) == 0 else (False, self.mom2.double())
        is_cholesky, mat = self._factor
        out = torch.cholesky_solve(cols, mat) if is_cholesky else torch.linalg.solve(mat, cols)
        return out[:, 0] if vec else out


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@torch.no_grad()
def compute_second_moments(
    model: nn.Module,
    tok,
    module_names: Sequence[str],
    corpus: Corpus,
    *,
    n_tokens: int,
    max_length: int = 256,
    dtype: str = "float32",
    batch_tokens: int = 2048,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, torch.Tensor]]:
    """``E[k kᵀ]`` and ``E[k]`` of the inputs of ``module_names``, in one streaming pass over ``corpus``.

    Returns:
        ``({module name: [d_in, d_in] matrix in dtype, on CPU}, {"n_tokens", "n_texts"},
        {module name: [d_in] mean in dtype, on CPU})``.
    """
    acc_dtype = DTYPES[dtype]
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    sums: dict[str, torch.Tensor] = {}
    firsts: dict[str, torch.Tensor] = {}
    seen = texts = 0
    order = {n: i for i, n in enumerate(_module_order(model, module_names))}
    deepest = max(module_names, key=lambda n: order[n])
    bar = tqdm(total=n_tokens, desc="second moments", unit="tok", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for batch in token_batches(tok, corpus, n_tokens, max_length, batch_tokens):
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            with capture_inputs(model, list(module_names), stop_after=deepest) as cap:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.reshape(-1).bool()
            for name in module_names:
                x = cap.inputs[name].reshape(-1, cap.inputs[name].shape[-1])[keep].to(acc_dtype)
                if name not in sums:
                    sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=acc_dtype, device=device)
                    firsts[name] = torch.zeros(x.shape[1], dtype=acc_dtype, device=device)
                sums[name].addmm_(x.T, x)
                firsts[name] += x.sum(0)
            n = int(keep.sum())
            seen += n
            texts += len(batch)
            bar.update(n)
            if texts == len(batch) and seen < n_tokens:  # after the first batch: say how long the rest takes
                rate = seen / max(time.perf_counter() - t0, 1e-6)
                log.warning("second-moment statistics: about %s for %d tokens (%.0f tokens/s on this machine)",
                            _duration((n_tokens - seen) / rate), n_tokens, rate)
    finally:
        bar.close()
    if seen == 0:
        raise ShiftEditError(f"corpus {corpus.name!r} yielded no tokens")
    if seen < n_tokens:
        log.warning("corpus %s has only %d tokens (asked for %d)", corpus.name, seen, n_tokens)
    return ({n: (s / seen).cpu() for n, s in sums.items()}, {"n_tokens": seen, "n_texts": texts},
            {n: (s / seen).cpu() for n, s in firsts.items()})


def _module_order(model: nn.Module, names: Sequence[str]) -> list[str]:
    wanted = set(names)
    return [n for n, _ in model.named_modules() if n in wanted]


# --- cache --------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60]


def cache_paths(fingerprint: str, corpus: Corpus, layer: int, n_tokens: int, max_length: int, dtype: str,
                 site: str = "ff2") -> tuple[Path, Path]:
    folder = cache_dir() / "stats" / fingerprint / f"{_slug(corpus.name)}-{corpus.identity[:12]}"
    stem = f"layer{layer}{'' if site == 'ff2' else '-' + site}-tok{n_tokens}-len{max_length}-{dtype}"
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def expected_meta(fingerprint: str, corpus: Corpus, layer: int, module: str, n_tokens: int, max_length: int,
                  dtype: str) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "model_fingerprint": fingerprint,
        "layer": layer,
        "module": module,
        "corpus": corpus.name,
        "corpus_kind": corpus.kind,
        "corpus_sha": corpus.identity,
        "requested_tokens": n_tokens,
        "max_length": max_length,
        "dtype": dtype,
    }


def _try_load(pt: Path, meta_path: Path, expected: dict[str, Any], need_mean: bool = False) -> SecondMoment | None:
    """The cached entry if it exists and is valid; ``None`` (with a warning) otherwise."""
    read = read_verified(pt, meta_path, expected, "statistics cache")
    if read is None:
        return None
    meta, tensors = read
    try:
        mom2, mean = tensors["mom2"], tensors.get("mean")
        d = int(meta["d_in"])
        if mom2.shape != (d, d) or str(mom2.dtype) != f"torch.{expected['dtype']}" or not torch.isfinite(mom2).all():
            log.warning("statistics cache %s holds a bad tensor; rebuilding", pt)
            return None
        if mean is None and need_mean:
            log.warning("statistics cache %s has no mean; rebuilding", pt)
            return None
        if mean is not None and (mean.shape != (d,) or not torch.isfinite(mean).all()):
            log.warning("statistics cache %s holds a bad mean; rebuilding", pt)
            return None
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("statistics cache %s is unreadable (%s); rebuilding", pt, exc)
        return None
    return SecondMoment(expected["layer"], mom2, meta, mean)


#: validated cache entries already read in this process, keyed by the files' path, size and
#: mtime (a changed file is read and checked again); bounded, least recently used dropped
_MEMO: OrderedDict[tuple, SecondMoment] = OrderedDict()
_MEMO_SIZE = 16


def _memo_key(pt: Path, meta_path: Path) -> tuple | None:
    try:
        a, b = pt.stat(), meta_path.stat()
    except OSError:
        return None
    return (str(pt), a.st_size, a.st_mtime_ns, b.st_size, b.st_mtime_ns)


def _memo_put(pt: Path, meta_path: Path, entry: SecondMoment) -> None:
    key = _memo_key(pt, meta_path)
    if key is None:
        return
    _MEMO[key] = entry
    _MEMO.move_to_end(key)
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)


# length: cache lookup, the announcement of a first computation, the one streaming pass and the cache write for
#   several layers share the per-layer paths and metadata
def layer_stats(
    model: nn.Module,
    tok,
    layers: Sequence[int],
    *,
    corpus: str | None = None,
    n_tokens: int = 100_000,
    max_length: int = 256,
    dtype: str = "float32",
    adapter: ModelAdapter | None = None,
    use_cache: bool = True,
    rebuild: bool = False,
    batch_tokens: int = 2048,
    progress: bool = True,
    site: Literal["ff2", "ff1"] = "ff2",
) -> dict[int, SecondMoment]:
    """``C = E[k kᵀ]`` of FF2 inputs (``site="ff1"``: of the MLP input, with its mean) at each of
    ``layers``, from the cache or one pass.

    Args:
        model, tok: the model and tokenizer.
        layers: layer indices (negative counts from the end).
        corpus: a text file or ``hf:<dataset>/<config>/<split>``; ``None``: :func:`default_corpus`.
        n_tokens: how many token vectors (non-padding tokens) to average over.
        max_length: truncation length of each text, in tokens.
        dtype: accumulation and storage dtype, ``float32`` or ``float64``.
        adapter: the model's adapter (default: from the architecture table).
        use_cache: read and write ``cache_dir()/stats``.
        rebuild: recompute (and overwrite the cache) even when a valid entry exists.

    Returns:
        ``{layer: SecondMoment}``; layers missing from the cache are computed together.
    """
    if dtype not in DTYPES:
        raise ShiftEditError(f"statistics dtype {dtype!r}: use one of {sorted(DTYPES)}")
    if n_tokens < 1 or max_length < 1:
        raise ShiftEditError(f"n_tokens ({n_tokens}) and max_length ({max_length}) must be >= 1")
    if site not in ("ff2", "ff1"):
        raise ShiftEditError(f"statistics site {site!r}: use 'ff2' or 'ff1'")
    adapter = adapter or ModelAdapter(model)

    def module_of(layer: int) -> str:
        return adapter.ff2_name(layer) if site == "ff2" else adapter.ff1_names(layer)[0]

    layers = sorted({adapter.check_layer(layer) for layer in layers})
    src = open_corpus(corpus)
    fingerprint = statistics_fingerprint(model)
    out: dict[int, SecondMoment] = {}
    todo: dict[int, tuple[Path, Path, dict]] = {}
    for layer in layers:
        pt, meta_path = cache_paths(fingerprint, src, layer, n_tokens, max_length, dtype, site)
        expected = expected_meta(fingerprint, src, layer, module_of(layer), n_tokens, max_length, dtype)
        hit = None
        if use_cache and not rebuild:
            key = _memo_key(pt, meta_path)
            hit = _MEMO.get(key) if key is not None else None
            if hit is not None and (any(hit.meta.get(k) != v for k, v in expected.items())
                                    or (site == "ff1" and hit.mean is None)):
                hit = None
            if hit is None:
                hit = _try_load(pt, meta_path, expected, need_mean=site == "ff1")
                if hit is not None:
                    _memo_put(pt, meta_path, hit)
        if hit is not None:
            log.info("statistics for layer %d from %s", layer, pt)
            out[layer] = hit
        else:
            todo[layer] = (pt, meta_path, expected)
    if todo:
        names = {module_of(layer): layer for layer in todo}
        log.warning("computing second-moment statistics of layer(s) %s%s over %d tokens of %s: once, then cached "
                    "under %s", sorted(todo), "" if site == "ff2" else " (MLP inputs)", n_tokens, src.name,
                    next(iter(todo.values()))[0].parent)
        with on_weights(model, fingerprint, f"statistics of layers {sorted(todo)}",
                         " (shift-edit stats, or layer_stats first)"):
            mats, counts, means = compute_second_moments(
                model, tok, list(names), src, n_tokens=n_tokens, max_length=max_length,
                dtype=dtype, batch_tokens=batch_tokens, progress=progress,
            )
        for name, layer in names.items():
            pt, meta_path, expected = todo[layer]
            mom2, mean = mats[name].contiguous(), means[name].contiguous()
            meta = {**expected, **counts, "d_in": int(mom2.shape[0])}
            if use_cache:
                meta = write_verified(pt, meta_path, {"mom2": mom2, "mean": mean}, meta)
            out[layer] = SecondMoment(layer, mom2, meta, mean)
            if use_cache:
                _memo_put(pt, meta_path, out[layer])
    return out


