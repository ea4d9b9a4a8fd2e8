"""SHIFT_NEURON on tiny offline models: the key's constraints, forward-pass count, the neuron fires at
the edit and not on the contrastive prompts, sequential edits never reuse a neuron, undo / patch / LoRA
rank, and the MLP-input statistics it reads."""

from unittest import mock

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.algorithms.shift.neurons import canonical, gate_key, mlp_of, neuron_key
from shift_edit.algorithms.shift.shift_neuron import ShiftNeuronHyperParams
from shift_edit.core.errors import ShiftEditError
from shift_edit.core.memory import EditMemory
from shift_edit.core.registry import get_algorithm
from shift_edit.files.lora import read_lora
from shift_edit.model.architectures import ModelAdapter, from_param_layout, weight_layout
from shift_edit.model.covariance import layer_stats
from shift_edit.model.hooks import capture_inputs

FACT = {"prompt": "{} lives in", "subject": "Bob", "target_new": " Rome"}
FACT2 = {"prompt": "{} works at", "subject": "Ann", "target_new": " IBM"}


def hp(corpus: str, **kw) -> ShiftNeuronHyperParams:
    # margin 0: tiny random models' margins saturate near 0.4; max_relative_norm None: their weights are small
    base = dict(layers=[1], n_contrast=4, skip_if_predicted=False, margin=0.0, mom2_corpus=corpus,
                mom2_n_tokens=200, mom2_max_length=40, max_relative_norm=None)
    return ShiftNeuronHyperParams(**{**base, **kw})


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def edit_counting_calls(model, tok, h: ShiftNeuronHyperParams, fact=FACT) -> tuple[se.EditResult, int]:
    """``se.edit`` of ``fact``, and how many times the model was called during it (a forward pre-hook)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        return se.edit(model, tok, fact, h, force=True), len(calls)
    finally:
        handle.remove()


def test_registered_with_memory():
    alg = get_algorithm("SHIFT_NEURON")
    assert alg.uses_memory and alg.hparams_class is ShiftNeuronHyperParams


@pytest.mark.parametrize("kw", [{"threshold": 1.0}, {"threshold": -0.1}, {"sharpness": 0.0}, {"activation": -1.0},
                                {"n_contrast": 99}, {"search_passes": 0}, {"if_unreached": "retry"},
                                {"min_spreads": 0.0}, {"min_spreads": 5.0, "max_threshold": 0.5},
                                {"min_spreads": 5.0, "max_threshold": 1.0}, {"negative_reach": 0.0}, {"negatives": -1},
                                {"try_layers": 0}, {"try_layers": 2}])
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


def _key_problem(seed: int = 0, d: int = 20):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    sigma = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    return sigma, mu, mu + 2 * torch.randn(d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("bias", [0.0, 0.8])
def test_min_spreads_raises_the_threshold_until_generic_text_is_that_many_spreads_below(bias):
    """The threshold β is the smallest grid value whose firing point sits ``min_spreads`` generic spreads above the
    mean; the pre-activation at the edit stays ``sharpness · (1 - threshold)`` and at the mean is ``-α β``."""
    sigma, mu, h_e = _key_problem()
    base = ShiftNeuronHyperParams(layers=[1], threshold=0.5, sharpness=20.0)
    fixed = gate_key(torch.linalg.inv(sigma), sigma, mu, h_e, None, 0.0, bias, base)
    assert (fixed.threshold, fixed.sharpness) == (0.5, 20.0)
    want = fixed.spreads * 1.05
    raised = gate_key(torch.linalg.inv(sigma), sigma, mu, h_e, None, 0.0, bias,
                      base.replace(min_spreads=want, max_threshold=0.95))
    assert 0.5 < raised.threshold <= 0.95 and raised.spreads >= want
    assert raised.spreads == pytest.approx(raised.threshold / float(raised.g @ sigma @ raised.g) ** 0.5)
    pre = lambda x: raised.sharpness * float(raised.g @ x) + bias  # noqa: E731
    assert pre(h_e) == pytest.approx(20.0 * 0.5, rel=1e-9)
    assert pre(mu) == pytest.approx(-raised.sharpness * raised.threshold, rel=1e-9)
    # out of reach: the grid's best β is used (and its spreads reported)
    far = gate_key(torch.linalg.inv(sigma), sigma, mu, h_e, None, 0.0, bias, base.replace(min_spreads=1e6))
    assert far.spreads < 1e6 and far.threshold > 0.5


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_forward_passes_per_edit_counted_with_a_hook(model_type, byte_tok, corpus):
    model = tiny_model(model_type)
    se.edit(model, byte_tok, FACT, hp(corpus), force=True).undo()  # statistics computed (and cached) first
    for passes in (1, 2, 3):
        h = hp(corpus, search_passes=passes)
        res, calls = edit_counting_calls(model, byte_tok, h)
        res.undo()
        assert calls == h.forward_passes == 1 + passes == res.info[0]["forward_passes"] <= 16


def test_the_guard_starts_at_the_edited_layer(byte_tok, corpus):
    """SHIFT_NEURON keeps its first pass's block inputs over the prompt: the guard's pass (the only one after the
    edit is applied) starts at the edited layer, fed the prompt's recorded input there."""
    from shift_edit.core import editing
    from shift_edit.core.requests import encode_prompt, make_request

    model = tiny_model("llama")
    starts = []
    real = editing.check_outputs

    def spy(model, tok, texts, orig, start=None):
        starts.append(start)
        return real(model, tok, texts, orig, start=start)

    with mock.patch.object(editing, "check_outputs", spy):
        for layer in (2, 1):
            assert se.edit(model, byte_tok, FACT, hp(corpus, layers=[layer])).deltas
    text = make_request(FACT).text
    assert [s[1] for s in starts] == [2, 1]
    assert starts[1][2][text].shape == (len(encode_prompt(byte_tok, text)), model.config.hidden_size)


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


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_memory_keys_above_the_edit_are_the_edited_models_inputs(byte_tok, corpus, model_type):
    """An edit's own push moves its prompt's MLP inputs above the edited layer; the memory keeps them as the
    edited model computes them (later neurons there must stay silent on those), and below and at the edited
    layer as before."""
    model = tiny_model(model_type)
    adapter = ModelAdapter(model)
    mlps = {x: mlp_of(adapter, x) for x in (0, 1, 2)}
    names = {x: mlps[x].ff1[0][0] for x in mlps}
    ids = torch.tensor([byte_tok(FACT["prompt"].format(FACT["subject"])).input_ids])

    def inputs():
        with capture_inputs(model, list(names.values())) as cap:
            model(input_ids=ids)
        return {x: cap.inputs[n].reshape(1, ids.shape[1], -1)[0, -1].float() for x, n in names.items()}

    before = inputs()
    mem = EditMemory()
    res = se.edit(model, byte_tok, {**FACT, "target_new": " R"}, hp(corpus, layers=[1, 0, 2]), memory=mem, force=True)
    assert res.info[0]["layer"] == 1 and res.info[0]["push"] > 0
    after = inputs()
    keys = {x: mem.keys(f"{names[x]}.weight") for x in names}
    assert all(len(k) == len(res.info[0]["neurons"]) for k in keys.values())  # a key per neuron; the first
    assert not torch.allclose(after[2], before[2], atol=1e-3)  # the push moved the layer above
    torch.testing.assert_close(keys[2][0], after[2], rtol=1e-4, atol=1e-4)  # fires at the prompt's last token
    for x in (0, 1):
        torch.testing.assert_close(keys[x][0], before[x], rtol=1e-5, atol=1e-5)


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
    mlp = mlp_of(ModelAdapter(model), 1)
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

    from shift_edit.algorithms.shift import neurons, shift_plus

    model = tiny_model("llama")
    se.edit(model, byte_tok, FACT, hp(corpus), force=True).undo()
    se.edit(model, byte_tok, FACT, shift_plus.ShiftPlusHyperParams(
        layers=[1], n_contrast=2, n_prefixes=0, skip_if_predicted=False, margin=0.0, mom2_corpus=corpus,
        mom2_n_tokens=200, mom2_max_length=40, max_relative_norm=None), force=True).undo()
    assert model in neurons._GENERIC and model in shift_plus._C_INV
    n_neuron, n_plus = len(neurons._GENERIC), len(shift_plus._C_INV)
    del model
    gc.collect()
    assert len(neurons._GENERIC) == n_neuron - 1 and len(shift_plus._C_INV) == n_plus - 1


GENERIC = ["A bird sat on the old fence.", "Rome lives in the heart of every traveller.", "Bob works in a shop.",
           "The river runs to the sea.", "Ann lives in a small town.", "Music fills the hall at night."]


def _generic_corpus(tmp_path) -> str:
    path = tmp_path / "generic.txt"
    path.write_text("\n\n".join(GENERIC) + "\n")
    return str(path)


def test_generic_sample_skips_the_statistics_tokens_and_is_pinned(byte_tok, corpus, tmp_path):
    """The sample is the MLP inputs of the texts after the skipped tokens, in order; under pinned statistics
    the cached sample of the unedited weights is read back after the weights change."""
    from shift_edit.model.generic_sample import generic_sample
    from shift_edit.model.stats_pinning import pinned_statistics

    model = tiny_model("llama")
    path = _generic_corpus(tmp_path)
    lengths = [len(byte_tok(t).input_ids) for t in GENERIC]
    name = ModelAdapter(model).ff1_names(1)[0]
    direct = []
    for text in GENERIC[2:4]:
        with capture_inputs(model, [name]) as cap:
            model(input_ids=torch.tensor([byte_tok(text).input_ids]))
        direct.append(cap.inputs[name].reshape(-1, cap.inputs[name].shape[-1]))
    skip = lengths[0] + lengths[1]
    with pinned_statistics(model):
        sample = generic_sample(model, byte_tok, [1], corpus=path, skip_tokens=skip, n_tokens=lengths[2] + lengths[3],
                                max_length=64)[1]
        torch.testing.assert_close(sample, torch.cat(direct))
        with torch.no_grad():
            ModelAdapter(model).module(name).weight.mul_(2.0)
        again = generic_sample(model, byte_tok, [1], corpus=path, skip_tokens=skip, n_tokens=lengths[2] + lengths[3],
                               max_length=64)[1]
    assert torch.equal(again, sample)
    with pytest.raises(ShiftEditError):
        generic_sample(model, byte_tok, [1], corpus=path, skip_tokens=-1)
    with pytest.raises(ShiftEditError, match="none after the first"):  # a corpus no longer than the skipped tokens
        generic_sample(model, byte_tok, [1], corpus=path, skip_tokens=sum(lengths), n_tokens=10, max_length=64)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_negatives_keep_the_key_below_half_the_threshold_on_generic_tokens(model_type, byte_tok, corpus, tmp_path):
    """With ``negatives``, the generic tokens the key would come within half the threshold of firing on become
    silent keys: fewer of the sample's tokens are near firing than without (and the edit still fires)."""
    from shift_edit.algorithms.shift.neurons import generic_keys

    path = _generic_corpus(tmp_path)
    near = {}
    for n in (0, 400):
        model = tiny_model(model_type)
        h = hp(corpus, mom2_corpus=path, mom2_n_tokens=40, mom2_max_length=64, threshold=0.2, n_contrast=0,
               negatives=n, negative_weight=1e6)
        res = se.edit(model, byte_tok, FACT, h, force=True)
        j = res.info[0]["neurons"][0]
        sample = generic_keys(model, byte_tok, ModelAdapter(model), [1], h.replace(negatives=400))[1].double()
        ff1 = ModelAdapter(model).module(ModelAdapter(model).ff1_names(1)[0])
        gate = canonical(ff1).double()[j]
        bias = float(ff1.bias.detach()[j]) if getattr(ff1, "bias", None) is not None else 0.0
        near[n] = int((sample @ gate + bias > -h.sharpness * h.threshold / 2).sum())
        assert res.info[0]["activation_at_edit"][j] > 0
    assert near[0] > 0 and near[400] < near[0], near


def test_a_sequential_run_primes_every_layer_and_the_sample_before_editing(byte_tok, corpus, tmp_path):
    """The bench's priming reads SHIFT_NEURON's statistics for every listed layer and its generic sample from the
    unedited model, so a layer first used after many edits (or after a resume) sees the unedited model's."""
    from shift_edit.algorithms.shift import neurons as sn
    from shift_edit.algorithms.shift.shift_neuron import prime_shift_neuron
    from shift_edit.bench.sequential import _prime
    from shift_edit.model import covariance
    from shift_edit.model.stats_pinning import pinned_statistics

    assert get_algorithm("SHIFT_NEURON").prime is prime_shift_neuron
    model = tiny_model("llama")
    h = hp(corpus, layers=[1, 0], mom2_corpus=_generic_corpus(tmp_path), mom2_n_tokens=40, mom2_max_length=64,
           negatives=100)
    passes = []
    real = covariance.compute_second_moments

    def counted(model, tok, names, *args, **kw):
        passes.append(list(names))
        return real(model, tok, names, *args, **kw)

    with pinned_statistics(model), mock.patch.object(covariance, "compute_second_moments", counted):
        _prime(model, byte_tok, h)
        assert len(passes) == 2 and all(len(names) == 2 for names in passes), passes  # one pass per site, both layers
        stats = {k[0]: v[0].clone() for k, v in sn._GENERIC[model].items()}
        sample = {k: v.clone() for k, v in sn.generic_keys(model, byte_tok, ModelAdapter(model), [1, 0], h).items()}
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        sn._GENERIC.pop(model)
        sn._NEGATIVES.pop(model)  # a resumed process: read back from the cache, not from the edited weights
        for layer in (0, 1):
            torch.testing.assert_close(sn.generic_stats(model, byte_tok, ModelAdapter(model), layer, h)[0],
                                       stats[layer])
        again = sn.generic_keys(model, byte_tok, ModelAdapter(model), [1, 0], h)
    assert set(stats) == {0, 1} and all(torch.equal(again[x], sample[x]) for x in (0, 1))


@pytest.mark.parametrize("n", [0, 1, 2047, 2048, 5000])
def test_fires_on_counts_as_the_float64_products_of_the_whole_sample(n):
    """The screen widens a float32 sample a block at a time: the same count as widening it all at once."""
    from shift_edit.algorithms.shift.neurons import Gate, fires_on

    gen = torch.Generator().manual_seed(n)
    sample = torch.randn(n, 24, generator=gen)
    gate = Gate(torch.randn(24, dtype=torch.float64, generator=gen), sharpness=25.0, threshold=0.1, spreads=3.0,
                bias=0.0)
    expected = int((sample.double() @ gate.g > gate.fires_at).sum())
    assert fires_on(gate, sample) == expected and (n < 2048 or 0 < expected < n)


def test_max_generic_fires_refuses_a_key_that_fires_on_generic_text(byte_tok, corpus, tmp_path):
    """With ``max_generic_fires`` (and the sample only screened, ``negative_weight: 0``), a request whose neuron
    would fire on more sample tokens than allowed is not applied; a looser bound applies the same key."""
    base = dict(mom2_corpus=_generic_corpus(tmp_path), mom2_n_tokens=40, mom2_max_length=64, threshold=0.05,
                n_contrast=0, negatives=400, negative_weight=0.0)
    model = tiny_model("llama")
    loose = se.edit(model, byte_tok, FACT, hp(corpus, **base, max_generic_fires=10_000), force=True)
    fires = loose.info[0]["generic_fires"]
    assert loose.deltas and max(fires) > 0
    loose.undo()
    before = weights(model)
    strict = se.edit(model, byte_tok, FACT, hp(corpus, **base, max_generic_fires=max(fires) - 1), force=True)
    assert not strict.deltas and strict.info[0]["generic_fires"] == fires
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ShiftEditError):
        ShiftNeuronHyperParams(layers=[1], max_generic_fires=3)  # needs negatives


@pytest.mark.parametrize("tries", [1, 2])
def test_a_request_refused_at_one_layer_tries_the_next(tries, byte_tok, corpus, monkeypatch):
    """With ``try_layers: 2`` a request whose neuron the screen refuses at layer 1 is written at layer 2, for
    ``search_passes`` more model calls (counted with a hook; the first pass serves both layers); with 1 it is not
    applied. The generic sample is replaced: at layer 1 copies of the edit's own key (its neuron fires on all), at
    layer 2 the zero vector (it fires on none)."""
    import shift_edit.algorithms.shift.shift_neuron as sn

    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    ids = torch.tensor([byte_tok("Bob lives in").input_ids])
    names = [adapter.ff1_names(x)[0] for x in (1, 2)]
    with capture_inputs(model, names) as cap:
        model(input_ids=ids)
    key = cap.inputs[names[0]].reshape(ids.shape[1], -1)[-1].double()
    sample = {1: key.repeat(20, 1), 2: torch.zeros(1, len(key), dtype=torch.float64)}
    monkeypatch.setattr(sn, "generic_keys", lambda *a, **k: sample)
    h = hp(corpus, layers=[1, 2], try_layers=tries, negatives=100, negative_weight=0.0, max_generic_fires=5)
    sn.prime_shift_neuron(model, byte_tok, h)  # statistics first: their passes are not the edit's
    res, calls = edit_counting_calls(model, byte_tok, h)
    info = res.info[0]
    assert info["layers_tried"] == [1, 2][:tries] and calls == info["forward_passes"]
    if tries == 1:
        assert not res.deltas and info["generic_fires"][0] == 20 and calls == 1
    else:
        assert info["layer"] == 2 and info["generic_fires"] == [0] * len(info["neurons"]) and info["reached_margin"]
        assert {d.layer for d in res.deltas} == {2} and calls == 1 + h.search_passes
        res.undo()


def test_silent_pool_measures_reach_from_the_firing_point_with_a_bias():
    """A key joins the silent set when its gate pre-activation comes within ``reach · β`` (on the key's scale) of
    the firing point ``-bias / α``: earlier edits' keys within half, generic tokens within ``negative_reach``."""
    from shift_edit.algorithms.shift.neurons import Gate, SilentPool

    h = ShiftNeuronHyperParams(layers=[1], negatives=10, negative_reach=0.1)
    e1 = torch.zeros(4, dtype=torch.float64)
    e1[0] = 1.0
    earlier = torch.zeros(3, 4, dtype=torch.float64)
    earlier[:, 0] = torch.tensor([-0.5, -0.4, 0.0])
    negatives = earlier.clone()
    pool = SilentPool.of(earlier, negatives, h)
    gate = Gate(e1, sharpness=10.0, threshold=0.5, spreads=0.0, bias=2.0)  # fires at gᵀx = -bias / α = -0.2
    assert gate.fires_at == -0.2
    # earlier keys: above -0.2 - 0.25 = -0.45 -> 1, 2; generic: above -0.2 - 0.05 = -0.25 -> 5
    assert pool.risky(gate, torch.zeros(0, dtype=torch.long)).tolist() == [1, 2, 5]
    assert pool.risky(gate, torch.tensor([2])).tolist() == [1, 5]
    assert pool.weights.tolist() == [h.memory_weight] * 3 + [h.negative_weight] * 3
    assert SilentPool.of(None, None, h) is None
