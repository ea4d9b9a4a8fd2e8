"""Undo is bit-exact, in place, and keeps tied weights tied."""

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se

FACTS = [("{} plays for", "Messi", "Paris"), ("The capital of {} is", "Italy", "Rome"),
         ("{} was born in", "Dante", "Florence"), ("{} is made by", "iPhone", "Nokia")]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_many_sequential_edits_undo_bit_exact(byte_tok):
    model = tiny_model("gpt2")
    base = snapshot(model)
    params_before = {n: id(p) for n, p in model.named_parameters()}
    results = []
    for i in range(20):
        prompt, subj, tgt = FACTS[i % len(FACTS)]
        hp = se.ShiftHyperParams(layers=[i % 3, (i + 1) % 3], eta=0.5 + 0.1 * i, skip_if_predicted=False)
        results.append(se.edit(model, byte_tok, {"prompt": prompt, "subject": subj, "target_new": tgt}, hp))
    assert any(not torch.equal(base[n], p) for n, p in model.state_dict().items())
    for r in reversed(results):
        r.undo()
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p), n
    assert {n: id(p) for n, p in model.named_parameters()} == params_before


def test_tied_weights_stay_tied(byte_tok):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    res = se.edit(model, byte_tok, {"prompt": "Messi plays for", "target_new": "Paris"},
                  se.ShiftHyperParams(layers=[2], eta=2.0, skip_if_predicted=False))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    res.undo()


def test_non_finite_delta_is_refused_and_nothing_changes(byte_tok):
    model = tiny_model("gpt2")
    base = snapshot(model)
    hp = se.ShiftHyperParams(layers=[1], eta=1e300, skip_if_predicted=False)  # overflows float32
    try:
        se.edit(model, byte_tok, {"prompt": "Messi plays for", "target_new": "Paris"}, hp)
    except se.ShiftEditError as exc:
        assert "non-finite" in str(exc)
    else:
        raise AssertionError("an overflowing edit must be refused")
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_non_finite_entry_anywhere_is_refused(bad, dtype):
    """The finiteness check sees a single NaN or ±inf entry, in any dtype, and changes nothing."""
    from shift_edit.core.deltas import WeightDelta, apply_deltas
    from shift_edit.model.architectures import ModelAdapter

    model = tiny_model("llama").to(dtype)
    adapter = ModelAdapter(model)
    name = adapter.ff2_name(1)
    weight = model.get_parameter(f"{name}.weight")
    dense = torch.zeros(weight.shape)  # nn.Linear: [out, in], the canonical orientation
    dense[-1, 3] = bad
    base = snapshot(model)
    with pytest.raises(se.ShiftEditError, match="non-finite"):
        apply_deltas(model, [WeightDelta(name, adapter.layout(adapter.module(name)), dense=dense)])
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p)
