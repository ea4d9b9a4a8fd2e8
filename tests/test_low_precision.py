"""The low-precision copy: made once per model and dtype, its tied weights tied, kept in step with the model's
weights after edits and undo, the model's own dtype and attention untouched."""

from __future__ import annotations

import torch
from _tiny import tiny_hparams, tiny_model

import shift_edit as se
from shift_edit.model.low_precision import drop_low_precision_copy, low_precision_copy


def _same_after_cast(model, low) -> bool:
    ours = dict(model.named_parameters())
    return all(torch.equal(p, ours[name].to(p.dtype)) for name, p in low.named_parameters())


def test_the_copy_is_made_once_cast_and_frozen_and_the_model_is_untouched():
    model = tiny_model("llama")
    attention = model.config._attn_implementation
    low = low_precision_copy(model, "bfloat16")
    assert low_precision_copy(model, torch.bfloat16) is low
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in low.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == attention and low.config._attn_implementation == "eager"
    assert _same_after_cast(model, low)
    drop_low_precision_copy(model)
    assert low_precision_copy(model, "bfloat16") is not low


def test_tied_weights_stay_tied_and_edits_and_undo_reach_the_copy(byte_tok, corpus):
    model = tiny_model("gpt2")
    low = low_precision_copy(model, "bfloat16")
    assert low.get_output_embeddings().weight is low.get_input_embeddings().weight
    res = se.edit(model, byte_tok, {"prompt": "{} plays for", "subject": "Messi", "target_new": " Rome"},
                  tiny_hparams("SHIFT", corpus), force=True)
    name = next(iter(res.orig_weights))
    edited = low_precision_copy(model, "bfloat16")
    assert edited is low and _same_after_cast(model, low)
    assert not torch.equal(low.get_parameter(name), res.orig_weights[name].to(torch.bfloat16))
    res.undo()
    assert _same_after_cast(model, low_precision_copy(model, "bfloat16"))
