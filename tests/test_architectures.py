"""The architecture table: every entry resolves on a tiny model; unknown types fail clearly."""

import pytest
import torch
from _tiny import TINY_CONFIGS, tiny_model

import shift_edit as se
from shift_edit.model.architectures import weight_layout

ARCHS = sorted(se.ARCHITECTURES)


def test_every_table_entry_has_a_tiny_model():
    assert set(ARCHS) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", ARCHS)
def test_adapter_resolves_modules(model_type):
    model = tiny_model(model_type)
    ad = se.ModelAdapter(model)
    assert ad.model_type == model_type
    assert ad.n_layers == 3
    for layer in range(3):
        ff2 = ad.ff2(layer)
        assert ff2.weight.ndim == 2
        assert ad.ff1(layer), "FF1 modules resolve"
        d_model = ad.decoding_matrix().shape[1]
        expected = "in_out" if model_type == "gpt2" else "out_in"
        assert ad.layout(ff2) == expected
        out_dim = ff2.weight.shape[1] if expected == "in_out" else ff2.weight.shape[0]
        assert out_dim == d_model
    assert isinstance(ad.final_norm(), torch.nn.Module)
    assert ad.input_embedding().shape[0] == ad.decoding_matrix().shape[0]


def test_unknown_model_type_names_supported_and_escape_hatch():
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    with pytest.raises(se.UnsupportedArchitectureError) as err:
        se.ModelAdapter(model)
    msg = str(err.value)
    assert "my_new_arch" in msg and "gpt2" in msg and "llama" in msg and "ff2_template" in msg
    ad = se.ModelAdapter(model, ff2_template="model.layers.{}.mlp.down_proj", final_norm="model.norm")
    assert ad.ff2(1) is model.model.layers[1].mlp.down_proj


def test_bad_layer_and_bad_template():
    ad = se.ModelAdapter(tiny_model("gpt2"))
    with pytest.raises(se.ShiftEditError, match="out of range.*3 layers"):
        ad.ff2(3)
    assert ad.check_layer(-1) == 2
    bad = se.ModelAdapter(tiny_model("gpt2"), ff2_template="transformer.h.{}.mlp.nope")
    with pytest.raises(se.ShiftEditError, match="no module 'transformer.h.0.mlp.nope'"):
        bad.ff2(0)


def test_weight_layout_rejects_other_modules():
    with pytest.raises(se.ShiftEditError, match="Embedding"):
        weight_layout(torch.nn.Embedding(3, 4))
