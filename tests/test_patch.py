"""Patches: small files, hash-checked base weights, exact revert; full save/reload."""

import json

import pytest
import torch
from _tiny import tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import shift_edit as se

REQS = [{"prompt": "{} plays for", "subject": "Messi", "target_new": "Paris"},
        {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Rome"}]


def logits(model, tok, text="Messi plays for the city of"):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok(text).input_ids])).logits


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_patch_apply_reproduces_the_edit_and_reverts_exactly(model_type, byte_tok, tmp_path):
    edited = tiny_model(model_type)
    result = se.edit(edited, byte_tok, REQS, se.ShiftHyperParams(layers=[0, 2], eta=0.8, skip_if_predicted=False))
    path = result.save_patch(tmp_path / "edit.safetensors")
    base = tiny_model(model_type)
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    applied = se.apply_patch(base, path)
    assert torch.equal(logits(base, byte_tok), logits(edited, byte_tok))
    assert [r.text for r in applied.requests] == [r.text for r in result.requests]
    se.revert_patch(base, path)
    for n, p in base.state_dict().items():
        assert torch.equal(before[n], p), n


def test_patch_contents(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    result = se.edit(model, byte_tok, REQS, se.ShiftHyperParams(layers=[1], eta=0.5, skip_if_predicted=False))
    path = result.save_patch(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        meta = json.loads(fh.metadata()["shift_edit"])
    assert keys == {"transformer.h.1.mlp.c_proj.left", "transformer.h.1.mlp.c_proj.right"}
    mod = meta["modules"]["transformer.h.1.mlp.c_proj"]
    assert mod["rank"] == 2 and mod["layout"] == "in_out" and len(mod["base_sha256"]) == 64
    assert meta["algorithm"] == "SHIFT" and meta["hparams"]["eta"] == 0.5
    assert meta["model"]["name_or_path"] == "tiny-gpt2"


def test_patch_on_the_wrong_base_is_refused(byte_tok, tmp_path):
    model = tiny_model("gpt2", seed=0)
    path = se.edit(model, byte_tok, REQS, se.ShiftHyperParams(layers=[1], eta=0.5, skip_if_predicted=False)).save_patch(
        tmp_path / "p.safetensors"
    )
    other = tiny_model("gpt2", seed=1)
    snapshot = {n: p.detach().clone() for n, p in other.state_dict().items()}
    with pytest.raises(se.PatchMismatchError, match="other base weights"):
        se.apply_patch(other, path)
    with pytest.raises(se.PatchMismatchError, match="does not have"):
        se.apply_patch(tiny_model("llama"), path)
    for n, p in other.state_dict().items():
        assert torch.equal(snapshot[n], p), "a refused patch changes nothing"
    # applying twice is refused too: the weights are no longer the base
    se.apply_patch(model_base := tiny_model("gpt2", seed=0), path)
    with pytest.raises(se.PatchMismatchError):
        se.apply_patch(model_base, path)


def test_bad_patch_files(tmp_path):
    with pytest.raises(se.ShiftEditError, match="patch file not found"):
        se.apply_patch(tiny_model("gpt2"), tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(se.ShiftEditError, match="not a readable safetensors patch"):
        se.apply_patch(tiny_model("gpt2"), junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(se.ShiftEditError, match="not a shift_edit patch"):
        se.apply_patch(tiny_model("gpt2"), plain)
    with pytest.raises(se.ShiftEditError, match="not applied to this model"):
        se.revert_patch(tiny_model("gpt2"), plain)
    for name, raw in (("badjson", "{not json"), ("nomodules", '{"format": "shift_edit.patch", "format_version": 1}'),
                      ("list", "[1, 2]")):
        bad = tmp_path / f"{name}.safetensors"
        save_file({"x": torch.zeros(2)}, str(bad), metadata={"shift_edit": raw})
        with pytest.raises(se.ShiftEditError, match=str(bad)):
            se.read_patch(bad)


def test_undone_edit_cannot_be_saved(byte_tok, tmp_path):
    result = se.edit(
        tiny_model("gpt2"), byte_tok, REQS[0], se.ShiftHyperParams(layers=[1], eta=0.5, skip_if_predicted=False)
    )
    result.undo()
    with pytest.raises(se.ShiftEditError, match="undone"):
        result.save_patch(tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_base_hashes_are_computed_on_first_read_and_match_the_original_weight(byte_tok, monkeypatch):
    from shift_edit.core import deltas as deltas_mod
    from shift_edit.files.io import tensor_hash

    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    want = tensor_hash(model.get_parameter(name))
    calls = []
    real = deltas_mod.tensor_hash
    monkeypatch.setattr(deltas_mod, "tensor_hash", lambda t: calls.append(1) or real(t))
    result = se.edit(model, byte_tok, REQS[0], se.ShiftHyperParams(layers=[1], eta=0.5, skip_if_predicted=False))
    assert calls == []  # editing alone hashes nothing
    assert list(result.base_hashes) == [name] and len(result.base_hashes) == 1
    assert result.base_hashes[name] == want and dict(result.base_hashes) == {name: want}
    assert result.base_hashes[name] == want and len(calls) == 1  # hashed once, then remembered
    assert tensor_hash(model.get_parameter(name)) != want  # the weight itself did change


def test_a_delta_for_a_missing_weight_is_refused_and_nothing_changes():
    from shift_edit.core.deltas import WeightDelta, apply_deltas

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = WeightDelta("model.layers.0.mlp.down_proj", "out_in", left=torch.ones(32, 1), right=torch.ones(1, 48))
    bad = WeightDelta("model.layers.9.mlp.down_proj", "out_in", left=torch.ones(32, 1), right=torch.ones(1, 48))
    with pytest.raises(se.ShiftEditError, match="no parameter 'model.layers.9.mlp.down_proj.weight'"):
        apply_deltas(model, [good, bad])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
