"""A low-precision copy of a model for passes that tolerate its rounding (an optimiser's inner steps), kept in step
with the model's weights.

On a CPU a forward or backward pass over a few tokens reads every weight once and is bound by memory bandwidth, so
a bfloat16 copy runs such passes in about half the time. The copy is made once per model and dtype and then held
while the model lives (half the model's size for bfloat16 of a float32 model); before each use, every parameter
or buffer of the model changed since (its in-place version counter moved, or its storage was replaced) is copied
into it again, so edits, undos and patches applied to the model reach the copy. Weights changed through ``.data``
(which bypasses the version counter) are not seen: call :func:`drop_low_precision_copy` after such a change.
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import nn

from .loading import resolve_dtype

log = logging.getLogger(__name__)

#: per model: {dtype: (the copy, {name: (version, data_ptr) of the model's tensor when last copied})}
_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict[torch.dtype, tuple[nn.Module, dict]]]" = (
    weakref.WeakKeyDictionary())

def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and floating buffers by name (tied ones once)."""
    out = dict(model.named_parameters())
    out.update((name, b) for name, b in model.named_buffers() if b.is_floating_point())
    return out


def _plain_attention(twin: nn.Module) -> None:
    """Switch a CPU copy from SDPA to the eager attention: in bfloat16, the CPU's SDPA backward kernel takes
    about 1.5 ms a layer on a few tokens of SmolLM2, against a fraction of that for the eager one (which
    takes the softmax in float32)."""
    config = getattr(twin, "config", None)
    on_cpu = next(twin.parameters()).device.type == "cpu"
    if on_cpu and getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(twin, "set_attn_implementation"):
        try:
            twin.set_attn_implementation("eager")
        except (ValueError, ImportError) as exc:  # a model without an eager path keeps SDPA
            log.info("low-precision copy keeps SDPA attention (%s)", exc)


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    return t._version, t.data_ptr()


@torch.no_grad()
def low_precision_copy(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """The model's copy in ``dtype`` (made on first use, then refreshed where the model's weights changed).

    The copy is in eval mode with ``requires_grad`` off everywhere; use it for passes only, never edit it.
    """
    dtype = resolve_dtype(dtype)
    per_model = _COPIES.setdefault(model, {})
    source = _tensors(model)
    if dtype not in per_model:
        twin = copy.deepcopy(model).to(dtype).eval()
        twin.requires_grad_(False)
        _plain_attention(twin)
        per_model[dtype] = (twin, {name: _stamp(t) for name, t in source.items()})
        log.info("made a %s copy of %s for low-precision passes", dtype, type(model).__name__)
        return twin
    twin, stamps = per_model[dtype]
    mirror = _tensors(twin)
    changed = [name for name, t in source.items() if stamps.get(name) != _stamp(t)]
    for name in changed:
        mirror[name].copy_(source[name])
        stamps[name] = _stamp(source[name])
    return twin


def drop_low_precision_copy(model: nn.Module) -> None:
    """Forget the model's low-precision copies (their memory is freed; the next use makes a new one)."""
    _COPIES.pop(model, None)
