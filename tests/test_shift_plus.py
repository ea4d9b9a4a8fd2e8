"""SHIFT_PLUS on tiny offline models: forward-pass count, the closed form's guarantees, undo,
patches and LoRA export, lifelong memory."""

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.algorithms.shift.shift_plus import ShiftPlusHyperParams, unit_update
from shift_edit.core.errors import ShiftEditError
from shift_edit.core.memory import EditMemory
from shift_edit.core.registry import get_algorithm

FACT = {"prompt": "{} lives in", "subject": "Bob", "target_new": " Rome"}
FACT2 = {"prompt": "{} works at", "subject": "Ann", "target_new": " IBM"}


def hp(**kw) -> ShiftPlusHyperParams:
    # whiten off: tiny models have no statistics; margin -inf-like: the search always succeeds;
    # max_relative_norm None: tiny random weights are small, so pushes exceed the edit guard's default bound
    base = dict(layers=[1], whiten=False, n_contrast=4, n_prefixes=2, skip_if_predicted=False,
                margin=-1e9, max_push=10.0, max_relative_norm=None)
    return ShiftPlusHyperParams(**{**base, **kw})


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_registered_with_memory():
    alg = get_algorithm("SHIFT_PLUS")
    assert alg.uses_memory and alg.hparams_class is ShiftPlusHyperParams


@pytest.mark.parametrize("kw", [{"layers": [1, 1]}, {"overshoot": 0.0}, {"n_contrast": 99}, {"search_passes": 0}])
def test_bad_hparams_are_refused(kw):
    with pytest.raises(ShiftEditError):
        hp(**kw)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("passes", [1, 2, 3])
@pytest.mark.parametrize("layers", [[1], [0, 1]])
def test_forward_passes_per_edit_counted_with_a_hook(model_type, passes, layers, byte_tok):
    model = tiny_model(model_type)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    h = hp(search_passes=passes, layers=layers)
    try:
        res = se.edit(model, byte_tok, FACT, h, force=True)  # the algorithm alone
        alone = len(calls)
        res.undo()
        se.edit(model, byte_tok, FACT, h)  # plus the edit guard's one finite-output pass over the prompt
    finally:
        handle.remove()
    assert alone == h.forward_passes == 1 + passes == res.info[0]["forward_passes"]
    assert len(calls) - alone == h.forward_passes + 1
    assert h.forward_passes + 1 <= 16


def test_skipped_request_costs_one_pass(byte_tok):
    model = tiny_model("llama")
    h = hp(margin=0.01, max_push=1e4, search_points=16, n_contrast=0, n_prefixes=0, skip_if_predicted=True)
    first = se.edit(model, byte_tok, FACT, h)
    assert first.info[0]["reached_margin"]
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        again = se.edit(model, byte_tok, FACT, h)  # now predicted: skipped after the first pass
    finally:
        handle.remove()
    assert again.skipped == [True] and not again.deltas and len(calls) == 1
    first.undo()


def test_unit_update_hits_edit_keys_and_is_orthogonal_to_preserved_keys():
    g = torch.Generator().manual_seed(0)
    d, d_out = 24, 10
    k_e, k_c, k_m = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (3, 5, 4))
    values = torch.randn(3, d_out, generator=g, dtype=torch.float64)
    c = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    c = c @ c.T / (2 * d)
    w = 1e9
    b_inv = torch.linalg.inv(c + w * k_m.T @ k_m)
    left, right = unit_update(b_inv, k_e, values, k_c, w, ridge=0.0)
    delta = left @ right
    assert torch.allclose(delta @ k_e.T, values.T, atol=1e-6)
    scale = (delta @ k_e.T).norm()
    assert (delta @ k_c.T).norm() / scale < 1e-5  # contrastive keys: what it claims to be orthogonal to
    assert (delta @ k_m.T).norm() / scale < 1e-5  # earlier edits' keys
    # without preserved keys the key is C⁻¹k-shaped (ROME's whitened key): zero on the C-orthogonal complement
    left0, right0 = unit_update(torch.linalg.inv(c), k_e[:1], values[:1], None, 0.0, ridge=0.0)
    u = torch.linalg.solve(c, k_e[0])
    assert torch.allclose(right0[0], u / (k_e[0] @ u), atol=1e-8)




def test_whitened_key_meets_the_disturbance_lower_bound():
    """eval/shift_plus/disturbance.py's bound: any key u with uᵀk = 1 disturbs generic text by
    uᵀCu >= 1/(kᵀC⁻¹k); the whitened key (no preserved keys) attains it, other keys do not."""
    g = torch.Generator().manual_seed(1)
    d = 16
    c = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    c = c @ c.T / (3 * d)
    k = torch.randn(d, generator=g, dtype=torch.float64)
    _, right = unit_update(torch.linalg.inv(c), k[None], torch.ones(1, 4, dtype=torch.float64), None, 0.0, ridge=0.0)
    u = right[0]
    bound = 1 / float(k @ torch.linalg.solve(c, k))
    assert abs(float(u @ k) - 1) < 1e-10
    assert abs(float(u @ c @ u) - bound) < 1e-10 * bound
    for _ in range(20):  # any other key that writes the same push disturbs more
        other = torch.randn(d, generator=g, dtype=torch.float64)
        other = other / float(other @ k)
        assert float(other @ c @ other) >= bound
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_sequential_edit_leaves_earlier_keys_unchanged(model_type, byte_tok):
    model = tiny_model(model_type)
    mem = EditMemory()
    h = hp(memory_weight=1e9)
    first = se.edit(model, byte_tok, FACT, h, memory=mem)
    param = first.deltas[0].param
    n_tok = len(first.info[0]["target_ids"])
    assert mem.keys(param).shape[0] == n_tok == first.deltas[0].rank  # rank = target tokens
    second = se.edit(model, byte_tok, FACT2, h, memory=mem)
    delta = second.deltas[0].canonical().double()
    old = mem.keys(param)[:n_tok].double()
    new = mem.keys(param)[n_tok:].double()
    assert (delta @ old.T).norm() / (delta @ new.T).norm() < 1e-4
    second.undo()
    first.undo()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_undo_is_bit_exact_and_patch_and_lora_roundtrip(model_type, byte_tok, tmp_path):
    model = tiny_model(model_type)
    base = weights(model)
    res = se.edit(model, byte_tok, [FACT, FACT2], hp())
    edited = weights(model)
    assert any(not torch.equal(edited[n], base[n]) for n in base)
    ranks = [len(i["target_ids"]) for i in res.info]
    assert [d.rank for d in res.deltas] == [sum(ranks)]
    path = res.save_patch(tmp_path / "edit.safetensors")
    exp = se.export_lora(res, tmp_path / "lora")
    assert list(exp.ranks.values()) == [sum(ranks)] and exp.exact  # a rank-r edit is a rank-r adapter
    res.undo()
    for n, w in weights(model).items():
        assert torch.equal(w, base[n])
    for source in (path, tmp_path / "lora"):
        fresh = tiny_model(model_type)
        applied = se.apply_patch(fresh, source)
        for n, w in weights(fresh).items():
            assert torch.allclose(w, edited[n], atol=1e-6)
        applied.undo()
        for n, w in weights(fresh).items():
            assert torch.equal(w, base[n])


def test_edit_reaches_the_margin_it_aims_at(byte_tok):
    """With a reachable margin the edited model predicts every target token (strict top-1)."""
    model = tiny_model("llama")
    h = hp(margin=0.01, max_push=1e4, search_points=16, n_contrast=0, n_prefixes=0)
    res = se.edit(model, byte_tok, FACT, h)
    assert res.info[0]["reached_margin"]
    from shift_edit.algorithms.common import already_predicted
    from shift_edit.core.requests import make_requests

    assert already_predicted(model, byte_tok, make_requests([FACT])) == [True]
    res.undo()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_spread_over_layers_each_layer_writes_its_share(model_type, byte_tok, tmp_path):
    """layers [0, 1]: one rank-m change per FF2, each writing half the push at its own edit key
    (keys of the unedited model), the margin reached, memory keys per layer, exact undo and LoRA."""
    from shift_edit.core.requests import encode_prompt, make_request
    from shift_edit.model.architectures import ModelAdapter
    from shift_edit.model.hooks import capture_inputs

    model = tiny_model(model_type)
    base = weights(model)
    adapter = ModelAdapter(model)
    req = make_request(FACT)
    ids = torch.tensor([encode_prompt(byte_tok, req.text)])
    names = [adapter.ff2_name(layer) for layer in (0, 1)]
    with torch.no_grad(), capture_inputs(model, names) as cap:
        model(input_ids=ids)
    keys = {n: cap.inputs[n].reshape(1, ids.shape[1], -1)[0, -1].double() for n in names}
    mem = EditMemory()
    h = hp(layers=[1, 0], n_contrast=0, n_prefixes=0, ridge=0.0, target_tokens="first",
           margin=0.01, max_push=1e4, search_points=16)
    res = se.edit(model, byte_tok, FACT, h, memory=mem)
    push = res.info[0]["push"]
    assert res.info[0]["reached_margin"] and res.info[0]["layers"] == [0, 1]
    assert sorted(d.module for d in res.deltas) == sorted(names) and all(d.rank == 1 for d in res.deltas)
    for d in res.deltas:
        written = d.canonical().double() @ keys[d.module]
        assert torch.allclose(written.norm(), torch.tensor(push / 2, dtype=torch.float64), rtol=1e-4)
        assert mem.keys(d.param).shape[0] == 1
    exp = se.export_lora(res, tmp_path / "lora")
    assert sorted(exp.ranks.values()) == [1, 1] and exp.exact
    res.undo()
    for n, w in weights(model).items():
        assert torch.equal(w, base[n])
