"""EditMemory: the keys of earlier edits travel to memory-using algorithms and are kept only
once an edit is applied."""

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.algorithms.common import EditHyperParams, adapter_for
from shift_edit.core.deltas import WeightDelta
from shift_edit.core.registry import _REGISTRY, Computed, register


class _MemProbeHParams(EditHyperParams):
    ALG_NAME = "_MEMPROBE"


@pytest.fixture
def probe_alg():
    seen = []

    def compute(model, tok, requests, hparams, *, memory=None):
        seen.append(None if memory is None else len(memory))
        adapter = adapter_for(model, hparams)
        name = adapter.ff2_name(hparams.layers[0])
        w = adapter.module(name).weight
        out, d_in = (w.shape[1], w.shape[0]) if adapter.layout(adapter.module(name)) == "in_out" else w.shape
        key = torch.full((1, d_in), float(len(seen)))
        delta = WeightDelta(name, adapter.layout(adapter.module(name)), left=torch.full((out, 1), hparams.scale),
                            right=torch.ones(1, d_in), layer=hparams.layers[0])
        return Computed([delta], [False] * len(requests), memory_keys={f"{name}.weight": key})

    register("_MEMPROBE", _MemProbeHParams, compute, "test probe", uses_memory=True)
    try:
        yield seen
    finally:
        del _REGISTRY["_MEMPROBE"]


def test_memory_collects_keys_in_order(byte_tok, probe_alg):
    model = tiny_model("gpt2")
    mem = se.EditMemory()
    hp = _MemProbeHParams(layers=[1], skip_if_predicted=False)
    hp.scale = 1e-3
    for _ in range(3):
        se.edit(model, byte_tok, {"prompt": "a {}", "subject": "b", "target_new": " c"}, hp, memory=mem)
    assert probe_alg == [0, 1, 2]
    (param,) = mem.params()
    assert param == "transformer.h.1.mlp.c_proj.weight"
    assert mem.keys(param)[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_refused_edit_leaves_memory_unchanged(byte_tok, probe_alg, tmp_path):
    model = tiny_model("gpt2")
    mem = se.EditMemory()
    hp = _MemProbeHParams(layers=[1], skip_if_predicted=False)
    hp.scale = 1e-3
    se.edit(model, byte_tok, {"prompt": "a {}", "subject": "b", "target_new": " c"}, hp, memory=mem)
    hp.scale = float("inf")
    with pytest.raises(se.ShiftEditError):
        se.edit(model, byte_tok, {"prompt": "a {}", "subject": "b", "target_new": " c"}, hp, memory=mem)
    assert len(mem) == 1
    mem.save(tmp_path / "mem.safetensors")
    back = se.EditMemory.load(tmp_path / "mem.safetensors")
    assert back.params() == mem.params()
    assert torch.equal(back.keys(mem.params()[0]), mem.keys(mem.params()[0]))
