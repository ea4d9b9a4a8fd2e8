"""The forward pass shift against a hand computation on tiny models of every architecture."""

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se

ARCHS = sorted(se.ARCHITECTURES)
REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": "Paris"}}


def reference_x(model, module, ids):
    """FF2's input at every position, captured by a hook written here (independent oracle)."""
    store = {}
    handle = module.register_forward_pre_hook(lambda _m, args: store.__setitem__("x", args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    handle.remove()
    x = store["x"]
    return x.view(1, len(ids), -1)[0]  # OPT flattens tokens inside its MLP


def expected_weight(w0, x, d, eta, conv1d):
    outer = eta * (torch.outer(x, d) if conv1d else torch.outer(d, x))
    return w0 + outer


@pytest.mark.parametrize("model_type", ARCHS)
def test_delta_equals_hand_computed_outer_product(model_type, byte_tok):
    model = tiny_model(model_type)
    ad = se.ModelAdapter(model)
    ff2 = ad.ff2(1)
    w0 = ff2.weight.detach().clone()
    prompt_ids = byte_tok("Messi plays for").input_ids
    target_first = byte_tok(" Paris").input_ids[0]
    x = reference_x(model, ff2, prompt_ids)[-1]
    d = model.get_output_embeddings().weight.detach()[target_first]
    hp = se.ShiftHyperParams(layers=[1], eta=0.7, skip_if_predicted=False)
    result = se.edit(model, byte_tok, REQ, hp)
    conv1d = model_type == "gpt2"
    torch.testing.assert_close(ff2.weight.detach(), expected_weight(w0, x, d, 0.7, conv1d), rtol=1e-5, atol=1e-6)
    assert result.summary()[0]["rank"] == 1 and result.summary()[0]["layer"] == 1
    result.undo()
    assert torch.equal(ff2.weight, w0)


@pytest.mark.parametrize("source", ["decoding", "input_embedding", "centered"])
@pytest.mark.parametrize("scaling", ["raw", "normalized"])
def test_d_source_and_eta_scaling(source, scaling, byte_tok):
    model = tiny_model("gptj")  # untied: decoding != input embedding
    ff2 = se.ModelAdapter(model).ff2(2)
    w0 = ff2.weight.detach().clone()
    x = reference_x(model, ff2, byte_tok("Messi plays for").input_ids)[-1]
    t = byte_tok(" Paris").input_ids[0]
    dec = model.get_output_embeddings().weight.detach()
    d = {"decoding": dec[t], "input_embedding": model.get_input_embeddings().weight.detach()[t],
         "centered": dec[t] - dec.mean(0)}[source]
    eta = 0.3 / (x @ x) if scaling == "normalized" else 0.3
    se.edit(model, byte_tok, REQ, se.ShiftHyperParams(layers=[2], eta=0.3, d_source=source, eta_scaling=scaling,
                                                      skip_if_predicted=False))
    torch.testing.assert_close(ff2.weight.detach(), expected_weight(w0, x, d, eta, False), rtol=1e-5, atol=1e-6)


def test_all_target_tokens_uses_teacher_forced_positions(byte_tok):
    model = tiny_model("llama")
    ff2 = se.ModelAdapter(model).ff2(0)
    w0 = ff2.weight.detach().clone()
    p = byte_tok("Messi plays for").input_ids
    t = byte_tok(" Paris").input_ids
    xs = reference_x(model, ff2, p + t[:-1])[len(p) - 1 :]
    dec = model.get_output_embeddings().weight.detach()
    expected = w0 + 0.2 * sum(torch.outer(dec[tok_id], x) for tok_id, x in zip(t, xs))
    res = se.edit(
        model, byte_tok, REQ, se.ShiftHyperParams(layers=[0], eta=0.2, target_tokens="all", skip_if_predicted=False)
    )
    torch.testing.assert_close(ff2.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert res.deltas[0].rank == len(t)


def test_batch_sums_deltas_computed_on_the_unedited_model(byte_tok):
    reqs = [REQ, {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Rome"}]
    batched = tiny_model("gpt2")
    se.edit(batched, byte_tok, reqs, se.ShiftHyperParams(layers=[1, 2], eta=0.5, skip_if_predicted=False))
    singles = tiny_model("gpt2")
    base = tiny_model("gpt2")
    deltas = []
    for r in reqs:  # each on the unedited model
        res = se.edit(singles, byte_tok, r, se.ShiftHyperParams(layers=[1, 2], eta=0.5, skip_if_predicted=False))
        deltas.append({d.param: d.in_param_layout() for d in res.deltas})
        res.undo()
    params = dict(batched.named_parameters())
    for name, p0 in base.named_parameters():
        want = p0.detach() + sum(d.get(name, 0) for d in deltas)
        torch.testing.assert_close(params[name].detach(), want, rtol=1e-5, atol=1e-6)


def test_early_exit_gives_the_same_delta(byte_tok):
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    ra = se.edit(a, byte_tok, REQ, se.ShiftHyperParams(layers=[0], eta=1.0, skip_if_predicted=False, early_exit=True))
    rb = se.edit(b, byte_tok, REQ, se.ShiftHyperParams(layers=[0], eta=1.0, skip_if_predicted=False, early_exit=False))
    assert torch.equal(ra.deltas[0].canonical(), rb.deltas[0].canonical())


def test_skip_when_already_predicted(byte_tok):
    model = tiny_model("gpt2")
    for prompt in ("Messi plays for ", "Messi plays at ", "Messi is in ", "Messi was "):
        with torch.no_grad():
            top = int(model(input_ids=torch.tensor([byte_tok(prompt).input_ids])).logits[0, -1].argmax())
        if byte_tok.decode([top]).strip():
            break
    req = {"prompt": prompt, "target_new": byte_tok.decode([top])}  # already the top-1 token
    res = se.edit(model, byte_tok, req, se.ShiftHyperParams(layers=[1], eta=1.0))
    assert res.skipped == [True] and res.deltas == [] and res.orig_weights == {}
    res2 = se.edit(model, byte_tok, req, se.ShiftHyperParams(layers=[1], eta=1.0, skip_if_predicted=False))
    assert res2.skipped == [False] and len(res2.deltas) == 1


def test_apply_shift_to_model_rome_contract(byte_tok):
    model = tiny_model("gpt2")
    param = model.transformer.h[1].mlp.c_proj.weight
    before = param.detach().clone()
    hp = se.ShiftHyperParams(layers=[1], eta=0.5, skip_if_predicted=False)
    copy_model, orig = se.apply_shift_to_model(model, byte_tok, [REQ], hp, copy=True, return_orig_weights=True)
    assert copy_model is not model and torch.equal(param, before)
    assert torch.equal(orig["transformer.h.1.mlp.c_proj.weight"], before)
    same, orig2 = se.apply_shift_to_model(model, byte_tok, [REQ], hp)
    assert same is model and orig2 == {}
    assert model.transformer.h[1].mlp.c_proj.weight is param, "Parameter object kept"
    assert not torch.equal(param, before)
