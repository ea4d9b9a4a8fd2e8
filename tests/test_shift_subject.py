"""SHIFT_SUBJECT: the gate fires at the subject in every context and not on other subjects, the cached value fit
equals the plain one, the stated forward/backward pass counts (counted by hooks), sequential edits keep earlier
neurons, and on the embedded SmolLM2 a paraphrase with a new prefix and another relation wording reaches the edit
(which SHIFT_NEURON's last-token key does not)."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_hparams, tiny_model

import shift_edit as se
from shift_edit.algorithms.locate.contexts import context_templates, encode_with_fact_index
from shift_edit.algorithms.shift import subject_value as sv
from shift_edit.algorithms.shift.shift_subject import ShiftSubjectHyperParams, prime_shift_subject
from shift_edit.core.errors import ShiftEditError
from shift_edit.core.memory import EditMemory
from shift_edit.core.registry import get_algorithm
from shift_edit.core.requests import encode_target, make_request
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.hooks import capture_inputs, owned_hooks
from shift_edit.model.low_precision import low_precision_copy

FACT = {"prompt": "{} plays for", "subject": "Messi", "target_new": " Rome"}
FACT2 = {"prompt": "{} works at", "subject": "Ann Lee", "target_new": " IBM"}


def hp(corpus: str, **kw) -> ShiftSubjectHyperParams:
    return tiny_hparams("SHIFT_SUBJECT", corpus, n_contrast=4, **kw)


def test_registered_with_memory_and_prime():
    alg = get_algorithm("SHIFT_SUBJECT")
    assert alg.uses_memory and alg.hparams_class is ShiftSubjectHyperParams and alg.prime is prime_shift_subject


@pytest.mark.parametrize("kw", [{"fact_token": "last"}, {"threshold": 1.0}, {"sharpness": 0.0}, {"try_layers": 2},
                                {"v_contexts_per_step": 0}, {"v_start_scales": []}, {"v_start_scales": [1.5]},
                                {"neurons_per_layer": 0}, {"n_contrast": -1}, {"if_unreached": "retry"},
                                {"v_num_grad_steps": 0}, {"max_generic_fires": 3}, {"negative_reach": 2.0},
                                {"min_spreads": 2.0, "max_threshold": 0.2}])
def test_bad_hparams_are_refused(kw):
    with pytest.raises(ShiftEditError):
        ShiftSubjectHyperParams(layers=[1], **kw)


def _activation(model, name: str, tok, template: str, subject: str, j: int) -> float:
    ids, idx = encode_with_fact_index(tok, template, subject, "subject_last")
    with torch.no_grad(), capture_inputs(model, [name]) as cap:
        model(input_ids=torch.tensor([ids]))
    return float(cap.inputs[name].reshape(len(ids), -1)[idx, j])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_neuron_fires_at_the_subject_in_every_context_and_not_on_other_subjects(arch, byte_tok, corpus):
    model = tiny_model(arch)
    h = hp(corpus)
    res = se.edit(model, byte_tok, FACT, h, force=True)
    info = res.info[0]
    j, layer = info["neuron"], info["layer"]
    ff2 = ModelAdapter(model).ff2_name(layer)
    at_edit = info["activation_at_edit"]
    want = h.activation if arch == "llama" else at_edit
    for ctx in context_templates(model, byte_tok, h.context_template_length_params, h.context_seed):
        got = _activation(model, ff2, byte_tok, ctx.replace("{}", FACT["prompt"]), FACT["subject"], j)
        assert got == pytest.approx(want, rel=1e-3), ctx
    for other in ("Paris", "Toyota", "Egypt"):  # among the contrastive subjects: kept silent
        assert abs(_activation(model, ff2, byte_tok, FACT["prompt"], other, j)) < 0.05 * want
    res.undo()


def _fit_inputs(model, tok, h: ShiftSubjectHyperParams):
    """What the value's preparation and fit take for :data:`FACT` at layer 1: the adapter, the request, its target
    ids, the context templates and the (FF1, FF2) module names."""
    adapter = ModelAdapter(model)
    req = make_request(FACT)
    target = encode_target(tok, req.text, req.target_new)
    templates = context_templates(model, tok, h.context_template_length_params, h.context_seed)
    return adapter, req, target, templates, ([adapter.ff1_names(1)[0]], [adapter.ff2_name(1)])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_cached_value_fit_equals_the_plain_one(arch, byte_tok, corpus):
    """The steps over the columns after the fact token with a KV cache give the δ of steps over whole rows."""
    model = tiny_model(arch)
    h = hp(corpus)
    adapter, req, target, templates, names = _fit_inputs(model, byte_tok, h)
    dev = torch.device("cpu")
    cached = sv._prepare(model, byte_tok, adapter, req, target, templates, "subject_last", *names, cached=True,
                         device=dev)
    plain = sv._prepare(model, byte_tok, adapter, req, target, templates, "subject_last", *names, cached=False,
                        device=dev)
    assert cached.cache is not None and plain.cache is None and cached.rows.suffix.shape[1] < plain.rows.suffix.shape[1]
    for a, b in zip(cached.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name in cached.keys:
        torch.testing.assert_close(cached.keys[name], plain.keys[name], rtol=1e-4, atol=1e-5)
    d_cached = sv.fit_value(model, adapter, 1, cached, target, h)
    d_plain = sv.fit_value(model, adapter, 1, plain, target, h)
    assert d_cached.steps == d_plain.steps == h.v_num_grad_steps
    torch.testing.assert_close(d_cached.delta, d_plain.delta, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_bfloat16_fit_keeps_exact_keys_and_finds_the_full_precision_value(arch, byte_tok, corpus):
    """``v_dtype``: the keys and FF2's output come from the model itself (one pass that stops after the layer), the
    rows and steps from its bfloat16 copy; the δ found points where the float32 fit's does; undo stays exact."""
    model = tiny_model(arch)
    h = hp(corpus)
    adapter, req, target, templates, names = _fit_inputs(model, byte_tok, h)
    full = sv.prepare(model, byte_tok, adapter, req, target, templates, "subject_last", *names)
    low = low_precision_copy(model, "bfloat16")
    low_adapter = ModelAdapter(low)
    half = sv.prepare(model, byte_tok, adapter, req, target, templates, "subject_last", *names, fit=(low, low_adapter))
    assert half.passes == full.passes + 1 and half.block_in[1].dtype == torch.bfloat16
    for name in full.keys:
        torch.testing.assert_close(half.keys[name], full.keys[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half.ff2_out[names[1][0]], full.ff2_out[names[1][0]], rtol=1e-5, atol=1e-6)
    a = sv.fit_value(model, adapter, 1, full, target, h)
    b = sv.fit_value(low, low_adapter, 1, half, target, h)
    assert b.delta.dtype == torch.float32 and torch.cosine_similarity(a.delta, b.delta, 0) > 0.95
    before = {n: p.clone() for n, p in model.named_parameters()}
    res = se.edit(model, byte_tok, FACT, h.replace(v_dtype="bfloat16"), force=True)
    assert res.info[0]["value_steps"] == h.v_num_grad_steps
    res.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_step_rows_rotate_the_generated_contexts_and_keep_the_bare_prompt_and_kl_row():
    assert sv.step_rows(6, None, 3) is None and sv.step_rows(6, 5, 0) is None  # every row
    seen = [sv.step_rows(6, 2, step) for step in range(5)]
    assert seen[:3] == [[0, 1, 2, 6], [0, 3, 4, 6], [0, 1, 5, 6]]
    assert {r for rows in seen for r in rows} == set(range(7))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_value_fit_on_context_subsets_runs_fewer_rows_and_agrees_cached_and_plain(arch, byte_tok, corpus):
    """``v_contexts_per_step``: each step's pass has the bare prompt, that many contexts and the KL row; the KV
    cache's rows are sliced to match (cached and plain fits agree); covering every context equals the full fit."""
    model = tiny_model(arch)
    h = hp(corpus, context_template_length_params=[[3, 4]])
    adapter, req, target, templates, names = _fit_inputs(model, byte_tok, h)
    prep = {c: sv._prepare(model, byte_tok, adapter, req, target, templates, "subject_last", *names, cached=c,
                           device=torch.device("cpu")) for c in (True, False)}
    assert prep[True].rows.n_contexts == 5
    batch = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: batch.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        sub = {c: sv.fit_value(model, adapter, 1, prep[c], target, h.replace(v_contexts_per_step=1)) for c in prep}
    finally:
        handle.remove()
    assert batch == [3] * (2 * h.v_num_grad_steps)  # bare prompt + 1 context + KL row, each step
    torch.testing.assert_close(sub[True].delta, sub[False].delta, rtol=1e-3, atol=1e-4)
    full = sv.fit_value(model, adapter, 1, prep[True], target, h)
    assert not torch.equal(full.delta, sub[True].delta)
    every = sv.fit_value(model, adapter, 1, prep[True], target, h.replace(v_contexts_per_step=4))
    assert torch.equal(every.delta, full.delta)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_vjp_start_lowers_the_loss_and_its_passes_are_counted(arch, byte_tok, corpus):
    """``v_start_scales``: δ starts along -∇NLL at a tried scale of the norm bound (one forward and backward pass,
    then one batched forward pass over the rows once per scale); its loss is below the loss at δ = 0."""
    model = tiny_model(arch)
    h = hp(corpus, v_start_scales=[0.25, 0.5, 1.0])
    adapter, req, target, templates, names = _fit_inputs(model, byte_tok, h)
    prep = sv._prepare(model, byte_tok, adapter, req, target, templates, "subject_last", *names, cached=True,
                       device=torch.device("cpu"))
    batch = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: batch.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        started = sv.fit_value(model, adapter, 1, prep, target, h, 0)
        plain = sv.fit_value(model, adapter, 1, prep, target, h.replace(v_start_scales=None), 1)
    finally:
        handle.remove()
    n = prep.rows.n_contexts + 1
    assert batch == [n, 3 * n, n]  # gradient pass, the 3 scales in one pass, the plain fit's first loss
    assert started.steps == 0 and started.forward_passes == 2 and started.backward_passes == 1
    bound = h.clamp_norm_factor * prep.ff2_out[adapter.ff2_name(1)].norm()
    assert any(torch.isclose(started.delta.norm(), s * bound, rtol=1e-4) for s in (0.25, 0.5, 1.0))
    run = sv._Runner(model, adapter, 1, prep)
    tgt = torch.tensor(target)
    with torch.no_grad(), owned_hooks() as hooks:
        hooks.forward_hook(adapter.module(adapter.ff2_name(1)), run.add)
        nll0 = sv._nll(run(torch.zeros_like(started.delta), None)[:-1], tgt)
        nll1 = sv._nll(run(started.delta, None)[:-1], tgt)
    assert nll1 < nll0 and plain.losses[0] > 0


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("gpt2", {}), ("llama", {"v_start_scales": [0.5, 1.0]}),
                                     ("llama", {"v_dtype": "bfloat16"}), ("gpt2", {"v_dtype": "bfloat16"})])
def test_forward_and_backward_passes_are_counted_and_bounded(arch, kw, byte_tok, corpus):
    model = tiny_model(arch)
    h = hp(corpus, **kw)
    prime_shift_subject(model, byte_tok, h)  # statistics and contexts first: their passes are not the edit's
    sv._CACHE_OK[model] = True  # the one-time cache check (a second preparation) is not counted here
    forward, backward = [], []
    # with v_dtype the rows and steps run on the low-precision copy: its passes are counted too
    models = [model, low_precision_copy(model, h.v_dtype)] if h.v_dtype else [model]
    handles = [m.register_forward_pre_hook(lambda *_: forward.append(1)) for m in models]
    handles += [m.get_output_embeddings().register_full_backward_hook(lambda *_: backward.append(1)) for m in models]
    try:
        res = se.edit(model, byte_tok, FACT, h, force=True)
    finally:
        for handle in handles:
            handle.remove()
    info = res.info[0]
    start = 1 if h.v_start_scales else 0
    assert len(backward) == info["backward_passes"] == h.v_num_grad_steps + start == h.passes["backward"]
    assert len(forward) == info["forward_passes"] == h.passes["forward"]
    res.undo()


def test_sequential_edits_use_new_neurons_and_the_new_one_is_silent_on_the_earlier_subject(byte_tok, corpus):
    model = tiny_model("llama")
    h = hp(corpus)
    memory = EditMemory()
    first = se.edit(model, byte_tok, FACT, h, memory=memory, force=True)
    second = se.edit(model, byte_tok, FACT2, h, memory=memory, force=True)
    j1, j2 = first.info[0]["neuron"], second.info[0]["neuron"]
    assert j1 != j2
    ff2 = ModelAdapter(model).ff2_name(1)
    assert abs(_activation(model, ff2, byte_tok, FACT["prompt"], FACT["subject"], j2)) < 0.05 * h.activation
    first_key = _activation(model, ff2, byte_tok, FACT["prompt"], FACT["subject"], j1)
    assert first_key == pytest.approx(h.activation, rel=1e-3)
    second.undo()
    first.undo()


def test_a_request_without_subject_is_refused(byte_tok, corpus):
    with pytest.raises(ShiftEditError, match="subject"):
        se.edit(tiny_model("llama"), byte_tok, {"prompt": "Messi plays for", "target_new": " Rome"}, hp(corpus),
                force=True)


def _top1(model, tok, prompt: str) -> str:
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        return tok.decode(int(model(input_ids=ids).logits[0, -1].argmax()))


def test_smollm2_paraphrase_reaches_the_edit_and_other_subjects_keep_theirs(smollm2):
    model, tok = smollm2
    shipped = se.load_hparams(get_algorithm("SHIFT_SUBJECT").shipped_hparams("smollm2-135m"))
    h = shipped.replace(mom2_n_tokens=4000)
    fact = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome"}
    paraphrase = "My friend sent me a postcard last week. The Eiffel Tower, a famous landmark, stands in the city of"
    other = "The Brandenburg Gate is located in the city of"
    before = _top1(model, tok, other)
    assert _top1(model, tok, paraphrase) != " Rome"
    res = se.edit(model, tok, fact, h)
    try:
        assert res.info[0]["top1"] and _top1(model, tok, fact["prompt"].format(fact["subject"])) == " Rome"
        assert _top1(model, tok, paraphrase) == " Rome"
        assert _top1(model, tok, other) == before
    finally:
        res.undo()


def test_a_failed_check_refits_the_value_once_with_more_steps(byte_tok, corpus):
    """``v_retry_steps``: a value too small for top-1 (one tiny step) is fitted again from the start with
    ``v_num_grad_steps + v_retry_steps`` steps, and both fits' passes are counted."""
    model = tiny_model("llama")
    h = hp(corpus, v_num_grad_steps=1, v_lr=1e-4, v_retry_steps=2, loss_stop=0.0)
    res = se.edit(model, byte_tok, FACT, h, force=True)
    info = res.info[0]
    assert info["value_fits"] == 2 and info["value_steps"] == 3
    assert info["backward_passes"] == 1 + 3
    assert info["forward_passes"] == h.passes["forward"] + 3 + 1
    res.undo()
    plain = se.edit(model, byte_tok, FACT, h.replace(v_retry_steps=0), force=True)
    assert plain.info[0]["value_fits"] == 1 and plain.info[0]["backward_passes"] == 1
    plain.undo()


def test_decoding_units_are_cached_per_model_until_the_matrix_changes():
    from shift_edit.algorithms.shift.neurons import decoding_units

    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    first = decoding_units(adapter)
    assert decoding_units(adapter) is first
    rows = torch.stack([first[t] for t in range(first.matrix.shape[0])])
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(len(rows)))
    assert first.matrix.data_ptr() == adapter.decoding_matrix().data_ptr()  # float32 on CPU: no copy
    assert first.written(3.5 * rows[7]) and not first.written(rows[7] + rows[8])
    with torch.no_grad():
        adapter.decoding_matrix()[3] *= 2.0  # in place: the version counter moves
    again = decoding_units(adapter)
    assert again is not first and torch.allclose(again[3], rows[3], atol=1e-6)
