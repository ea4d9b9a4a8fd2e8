"""SHIFT_NEURON on tiny offline models: the key's constraints, forward-pass count, the neuron fires at
the edit and not on the contrastive prompts, sequential edits never reuse a neuron, undo / patch / LoRA
rank, and the MLP-input statistics it reads."""

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.algorithms.shift_neuron import ShiftNeuronHyperParams, _mlp, neuron_key
from shift_edit.architectures import ModelAdapter, from_param_layout, weight_layout
from shift_edit.covariance import layer_stats
from shift_edit.errors import ShiftEditError
from shift_edit.hooks import capture_inputs
from shift_edit.lora import read_lora
from shift_edit.memory import EditMemory
from shift_edit.registry import get_algorithm

FACT = {"prompt": "{} lives in", "subject": "Bob", "target_new": " Rome"}
FACT2 = {"prompt": "{} works at", "subject": "Ann", "target_new": " IBM"}


def hp(corpus: str, **kw) -> ShiftNeuronHyperParams:
    # margin 0: tiny random models' margins saturate near 0.4; max_relative_norm None: their weights are small
    base = dict(layers=[1], n_contrast=4, skip_if_predicted=False, margin=0.0, mom2_corpus=corpus,
                mom2_n_tokens=200, mom2_max_length=40, max_relative_norm=None)
    return ShiftNeuronHyperParams(**{**base, **kw})


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_registered_with_memory():
    alg = get_algorithm("SHIFT_NEURON")
    assert alg.uses_memory and alg.hparams_class is ShiftNeuronHyperParams


@pytest.mark.parametrize("kw", [{"threshold": 1.0}, {"threshold": -0.1}, {"sharpness": 0.0}, {"activation": -1.0},
                                {"n_contrast": 99}, {"search_passes": 0}, {"if_unreached": "retry"}])
def test_bad_hparams_are_refused(kw):
    with pytest.raises(ShiftEditError):
        ShiftNeuronHyperParams(layers=[1], **kw)


def test_neuron_key_meets_its_constraints_and_silences_the_contrast():
    g = torch.Generator().manual_seed(0)
    d = 20
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    sigma = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    h_e = mu + torch.randn(d, generator=g, dtype=torch.float64)
    silent = mu + torch.randn(6, d, generator=g, dtype=torch.float64)
    w = neuron_key(torch.linalg.inv(sigma), mu, h_e, silent, 1e8, 1.0, -0.7)
    assert float(w @ (h_e - mu)) == pytest.approx(1.0, abs=1e-9)
    assert float(w @ mu) == pytest.approx(-0.7, abs=1e-9)
    torch.testing.assert_close((silent - mu) @ w, torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0)
    # without silent keys it is the least-variance solution: any feasible change raises wᵀΣw
    w0 = neuron_key(torch.linalg.inv(sigma), mu, h_e, None, 0.0, 1.0, -0.7)
    null = torch.linalg.svd(torch.stack([h_e - mu, mu]))[2][2:]  # directions keeping both constraints
    for v in null[:5]:
        assert float((w0 + 0.1 * v) @ sigma @ (w0 + 0.1 * v)) > float(w0 @ sigma @ w0)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_forward_passes_per_edit_counted_with_a_hook(model_type, byte_tok, corpus):
    model = tiny_model(model_type)
    se.edit(model, byte_tok, FACT, hp(corpus), force=True).undo()  # statistics computed (and cached) first
    for passes in (1, 2, 3):
        h = hp(corpus, search_passes=passes)
        calls = []
        handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            res = se.edit(model, byte_tok, FACT, h, force=True)
        finally:
            handle.remove()
        res.undo()
        assert len(calls) == h.forward_passes == 1 + passes == res.info[0]["forward_passes"] <= 16


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_the_neuron_fires_at_the_edit_and_not_on_the_contrast(model_type, byte_tok, corpus):
    """After the edit, the rewritten neuron's activation (FF2's input) is ``activation`` (gated MLP) at the
    prompt's last token, and near zero on the same template with the contrastive subjects."""
    model = tiny_model(model_type)
    h = hp(corpus, n_contrast=4, contrast_weight=1e6)
    res = se.edit(model, byte_tok, FACT, h, force=True)
    info = res.info[0]
    j = info["neurons"][0]
    name = ModelAdapter(model).ff2_name(1)

    def act(text: str) -> float:
        with capture_inputs(model, [name]) as cap:
            model(input_ids=torch.tensor([byte_tok(text).input_ids]))
        return float(cap.inputs[name].reshape(-1, cap.inputs[name].shape[-1])[-1, j])

    at_edit = act("Bob lives in")
    if model_type == "llama":
        assert at_edit == pytest.approx(h.activation, rel=1e-3)
    assert at_edit > 1.0
    for other in ("Paris", "Toyota", "Brazil", "Microsoft"):  # the first contrastive subjects
        assert abs(act(f"{other} lives in")) < 0.01 * at_edit, other
    res.undo()


@pytest.mark.parametrize("use_memory", [True, False])
def test_sequential_edits_never_reuse_a_neuron(use_memory, byte_tok, corpus):
    """Edit 2 takes another neuron whether or not a memory is passed (without one, the neurons this
    algorithm wrote are recognised from the weights), and leaves edit 1's neuron as it was."""
    model = tiny_model("llama")
    mem = EditMemory() if use_memory else None
    h = hp(corpus)
    first = se.edit(model, byte_tok, FACT, h, memory=mem, force=True)
    down = ModelAdapter(model).ff2(1)
    cols = {j: down.weight[:, j].detach().clone() for j in first.info[0]["neurons"]}
    second = se.edit(model, byte_tok, FACT2, h, memory=mem, force=True)
    assert not set(first.info[0]["neurons"]) & set(second.info[0]["neurons"])
    for j, col in cols.items():
        assert torch.equal(down.weight[:, j], col)
    if use_memory:
        ff2 = mem.keys(ModelAdapter(model).param_name(ModelAdapter(model).ff2_name(1)))
        assert len(ff2) == len(first.info[0]["neurons"]) + len(second.info[0]["neurons"])


def test_with_memory_a_new_neuron_is_silent_on_earlier_prompts(byte_tok, corpus):
    """The memory holds each edit's MLP inputs; the next edit's neuron is kept silent on them (and
    without the memory term it is not)."""
    acts = {}
    for weight in (1e6, 0.0):
        model = tiny_model("llama")
        mem = EditMemory()
        h = hp(corpus, n_contrast=0, memory_weight=weight)
        se.edit(model, byte_tok, FACT, h, memory=mem, force=True)
        second = se.edit(model, byte_tok, {**FACT, "subject": "Rob"}, h, memory=mem, force=True)
        name = ModelAdapter(model).ff2_name(1)
        with capture_inputs(model, [name]) as cap:
            model(input_ids=torch.tensor([byte_tok("Bob lives in").input_ids]))
        acts[weight] = abs(float(cap.inputs[name][0, -1, second.info[0]["neurons"][0]]))
    assert acts[0.0] > 0.2 * h.activation  # "Rob lives in" is close to "Bob lives in": it would fire there
    assert acts[1e6] < 0.05 * h.activation


def test_with_memory_the_layers_fill_up_in_order(byte_tok, corpus):
    model = tiny_model("llama")
    mem = EditMemory()
    h = hp(corpus, layers=[2, 1], neurons_per_layer=6)  # " Rome" is 5 byte tokens, " IBM" 4
    layers = [se.edit(model, byte_tok, req, h, memory=mem, force=True).info[0]["layer"] for req in (FACT, FACT2)]
    assert layers == [2, 1]
    with pytest.raises(ShiftEditError, match="neurons_per_layer"):
        se.edit(model, byte_tok, FACT, h, memory=mem, force=True)


def test_unreached_margin_skip_leaves_the_model_alone(byte_tok, corpus):
    model = tiny_model("llama")
    before = weights(model)
    res = se.edit(model, byte_tok, FACT, hp(corpus, margin=1e6, if_unreached="skip"), force=True)
    assert res.skipped == [False] and not res.deltas and res.info[0]["reached_margin"] is False
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    capped = se.edit(model, byte_tok, FACT, hp(corpus, margin=1e6, max_push=7.0), force=True)
    assert capped.deltas and capped.info[0]["push"] == 7.0


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi3"])
def test_undo_is_bit_exact_and_the_lora_rank_is_the_neuron_count(model_type, byte_tok, corpus, tmp_path):
    model = tiny_model(model_type)
    before = weights(model)
    res = se.edit(model, byte_tok, FACT, hp(corpus), force=True)
    n = len(res.info[0]["neurons"])
    mlp = _mlp(ModelAdapter(model), 1)
    per_neuron = {"plain": 1, "gated": 1, "fused": 2}[mlp.kind]  # rows rewritten per FF1 matrix
    for d in res.deltas:
        assert d.rank == (n * per_neuron if d.module != mlp.ff2_name and mlp.kind == "fused" else n)
    lora = se.export_lora(res, tmp_path / "lora")
    assert set(lora.ranks.values()) <= {n, n * per_neuron}
    _, adapter = read_lora(tmp_path / "lora")
    for d in adapter:
        want = next(x for x in res.deltas if x.module == d.module).canonical()
        torch.testing.assert_close(d.canonical(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    res.undo()
    assert all(torch.equal(before[n_], p) for n_, p in model.state_dict().items())


def test_ff1_statistics_carry_the_mean(byte_tok, corpus):
    """``site="ff1"``: the MLP input's mean and second moment, equal to a direct computation, cached."""
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    st = layer_stats(model, byte_tok, [1], corpus=corpus, n_tokens=60, max_length=20, site="ff1", progress=False)[1]
    name = adapter.ff1_names(1)[0]
    xs, n = [], 0
    for line in open(corpus, encoding="utf-8"):
        line = line.strip()
        if not line or n >= 60:
            continue
        ids = byte_tok(line, truncation=True, max_length=20).input_ids[: 60 - n]
        with capture_inputs(model, [name]) as cap:
            model(input_ids=torch.tensor([ids]))
        xs.append(cap.inputs[name][0])
        n += len(ids)
    x = torch.cat(xs).double()
    torch.testing.assert_close(st.mean.double(), x.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.mom2.double(), x.T @ x / len(x), rtol=1e-4, atol=1e-5)
    again = layer_stats(model, byte_tok, [1], corpus=corpus, n_tokens=60, max_length=20, site="ff1", progress=False)[1]
    assert torch.equal(again.mean, st.mean) and torch.equal(again.mom2, st.mom2)
    ff2 = layer_stats(model, byte_tok, [1], corpus=corpus, n_tokens=60, max_length=20, progress=False)[1]
    assert ff2.mom2.shape[0] == from_param_layout(adapter.ff2(1).weight, weight_layout(adapter.ff2(1))).shape[1]


def test_statistics_are_cached_per_model_object(byte_tok, corpus):
    """The per-process statistics are keyed by the model object (weakly), never by ``id(model)``: a model
    freed and replaced by another (which may get the same id) cannot read the first one's statistics."""
    import gc

    from shift_edit.algorithms import shift_neuron, shift_plus

    model = tiny_model("llama")
    se.edit(model, byte_tok, FACT, hp(corpus), force=True).undo()
    se.edit(model, byte_tok, FACT, shift_plus.ShiftPlusHyperParams(
        layers=[1], n_contrast=2, n_prefixes=0, skip_if_predicted=False, margin=0.0, mom2_corpus=corpus,
        mom2_n_tokens=200, mom2_max_length=40, max_relative_norm=None), force=True).undo()
    assert model in shift_neuron._GENERIC and model in shift_plus._C_INV
    n_neuron, n_plus = len(shift_neuron._GENERIC), len(shift_plus._C_INV)
    del model
    gc.collect()
    assert len(shift_neuron._GENERIC) == n_neuron - 1 and len(shift_plus._C_INV) == n_plus - 1
