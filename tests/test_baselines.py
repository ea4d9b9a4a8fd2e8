"""SGD, ADAM, FT and FT_L against hand computations on tiny models; undo and skip behave alike."""

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.algorithms.adam import AdamHyperParams
from shift_edit.algorithms.ft import FTHyperParams
from shift_edit.algorithms.ft_l import FTLHyperParams
from shift_edit.algorithms.sgd import SGDHyperParams

REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": "Paris"}}


def first_token_loss(model, byte_tok):
    ids = byte_tok("Messi plays for").input_ids
    t = byte_tok(" Paris").input_ids[0]
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return -torch.log_softmax(logits.float(), -1)[t]


def hand_grad(model, weight, byte_tok):
    """The gradient of the first-token NLL w.r.t. ``weight``, by autograd written here."""
    (g,) = torch.autograd.grad(first_token_loss(model, byte_tok), [weight])
    return g


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("matrices", ["ff2", "ff1", "both"])
def test_sgd_step_equals_hand_computed_gradient_step(model_type, matrices, byte_tok):
    model = tiny_model(model_type)
    ad = se.ModelAdapter(model)
    mods = {"ff2": [ad.ff2(1)], "ff1": ad.ff1(1), "both": ad.ff1(1) + [ad.ff2(1)]}[matrices]
    w0 = [m.weight.detach().clone() for m in mods]
    grads = [hand_grad(model, m.weight, byte_tok) for m in mods]
    model.zero_grad(set_to_none=True)
    res = se.edit(model, byte_tok, REQ, SGDHyperParams(layers=[1], lr=0.3, matrices=matrices, skip_if_predicted=False, max_relative_norm=None))
    for m, w, g in zip(mods, w0, grads):
        torch.testing.assert_close(m.weight.detach(), w - 0.3 * g, rtol=1e-5, atol=1e-6)
    assert len(res.deltas) == len(mods) and all(d.dense is not None for d in res.deltas)
    res.undo()
    for m, w in zip(mods, w0):
        assert torch.equal(m.weight, w)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_sgd_ff2_target_position_is_outer_product_x_delta(model_type, byte_tok):
    """grad_positions='target': the step is lr * δ_n x_nᵀ (paper's decomposition, one token)."""
    model = tiny_model(model_type)
    ff2 = se.ModelAdapter(model).ff2(0)
    w0 = ff2.weight.detach().clone()
    store = {}
    h1 = ff2.register_forward_pre_hook(lambda _m, a: store.__setitem__("x", a[0]))
    h2 = ff2.register_forward_hook(lambda _m, _a, out: store.__setitem__("y", out))
    loss = first_token_loss(model, byte_tok)
    h1.remove(); h2.remove()
    (dy,) = torch.autograd.grad(loss, [store["y"]])
    x_n, delta_n = store["x"][0, -1].detach(), dy[0, -1]
    res = se.edit(model, byte_tok, REQ, SGDHyperParams(layers=[0], lr=0.5, grad_positions="target", skip_if_predicted=False, max_relative_norm=None))
    canonical = -0.5 * torch.outer(delta_n, x_n)  # [out, in]
    expected = w0 + (canonical.T if model_type == "gpt2" else canonical)
    torch.testing.assert_close(ff2.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(res.deltas[0].canonical()) == 1
    res.undo()
    assert torch.equal(ff2.weight, w0)


def test_sgd_target_positions_equal_full_gradient_at_last_layer(byte_tok):
    model = tiny_model("llama")
    full = se.get_algorithm("SGD").compute(model, byte_tok, se.make_requests(REQ), SGDHyperParams(layers=[2], lr=1.0, skip_if_predicted=False))
    tgt = se.get_algorithm("SGD").compute(model, byte_tok, se.make_requests(REQ), SGDHyperParams(layers=[2], lr=1.0, grad_positions="target", skip_if_predicted=False))
    torch.testing.assert_close(full.deltas[0].dense, tgt.deltas[0].dense, rtol=1e-5, atol=1e-7)


def test_adam_first_step_is_lr_sign_grad(byte_tok):
    model = tiny_model("llama")
    ff2 = se.ModelAdapter(model).ff2(1)
    g = hand_grad(model, ff2.weight, byte_tok)
    w0 = ff2.weight.detach().clone()
    res = se.edit(model, byte_tok, REQ, AdamHyperParams(layers=[1], lr=1e-3, skip_if_predicted=False))
    step = ff2.weight.detach() - w0
    big = g.abs() > 1e-5  # where eps is negligible the step is lr * sign(grad)
    torch.testing.assert_close(step[big], -1e-3 * g[big].sign(), rtol=1e-3, atol=1e-7)
    assert step.abs().max() <= 1e-3 * (1 + 1e-4)
    res.undo()
    assert torch.equal(ff2.weight, w0)


def test_ft_l_never_leaves_its_box_and_ft_does(byte_tok):
    model = tiny_model("gpt2")
    eps = 2e-3
    kw = dict(layers=[0, 2], lr=1e-2, steps=10, early_stop_nll=0.0, skip_if_predicted=False)
    c = se.get_algorithm("FT_L").compute(model, byte_tok, se.make_requests(REQ), FTLHyperParams(norm_constraint=eps, **kw))
    assert all(d.dense.abs().max() <= eps * (1 + 1e-5) for d in c.deltas)
    assert max(float(d.dense.abs().max()) for d in c.deltas) > 0.5 * eps
    u = se.get_algorithm("FT").compute(model, byte_tok, se.make_requests(REQ), FTHyperParams(**kw))
    assert max(float(d.dense.abs().max()) for d in u.deltas) > 2 * eps


def test_ft_lowers_the_target_nll_and_stops_early(byte_tok):
    model = tiny_model("llama")
    before = se.scoring.score_continuations(model, byte_tok, ["Messi plays for"], [" Paris"])[0].mean_nll
    stop = before - 0.3  # a random tiny model moves slowly; any threshold below the start works
    res = se.edit(model, byte_tok, REQ, FTHyperParams(layers=[0, 1, 2], matrices="both", lr=5e-2, steps=30, max_relative_norm=None,
                                                      early_stop_nll=stop, skip_if_predicted=False))
    after = se.scoring.score_continuations(model, byte_tok, ["Messi plays for"], [" Paris"])[0].mean_nll
    assert after < before
    assert res.info[0]["steps"] < 30 and res.info[0]["loss_last"] < stop
    assert after == pytest.approx(res.info[0]["loss_last"], rel=1e-4)
    res.undo()


ALL = [
    lambda: SGDHyperParams(layers=[1], lr=0.5, max_relative_norm=None),
    lambda: AdamHyperParams(layers=[1], lr=1e-3, matrices="both"),
    lambda: FTHyperParams(layers=[0, 2], lr=1e-2, steps=3, matrices="ff1", max_relative_norm=None),
    lambda: FTLHyperParams(layers=[1], lr=1e-2, steps=3, norm_constraint=1e-3),
]


@pytest.mark.parametrize("make", ALL, ids=["SGD", "ADAM", "FT", "FT_L"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_compute_leaves_model_untouched_and_undo_is_exact(make, model_type, byte_tok):
    model = tiny_model(model_type)
    for p in model.parameters():  # a mix of flags and existing grads that must survive
        p.grad = None
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    hp = make().replace(skip_if_predicted=False)
    c = se.get_algorithm(type(hp).ALG_NAME).compute(model, byte_tok, se.make_requests(REQ), hp)
    assert c.deltas and all(d.norm() > 0 for d in c.deltas)
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    res = se.edit(model, byte_tok, REQ, hp)
    assert any(not torch.equal(base[n], p) for n, p in model.state_dict().items())
    res.undo()
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p), n
    assert {n: id(p) for n, p in model.named_parameters()} == ids


@pytest.mark.parametrize("make", ALL, ids=["SGD", "ADAM", "FT", "FT_L"])
def test_skip_rule_is_shared(make, byte_tok):
    model = tiny_model("llama")
    # the tiny random llama predicts "]" after this prompt (ends with a space: no space added)
    reqs = [{"prompt": "The capital is ", "target_new": "]"}, REQ]
    expected = se.algorithms.common.already_predicted(model, byte_tok, se.make_requests(reqs))
    assert expected == [True, False]
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    res = se.edit(model, byte_tok, reqs, make())
    assert res.skipped == expected and res.deltas
    res.undo()
    only = se.edit(model, byte_tok, reqs[:1], make())
    assert only.skipped == [True] and only.deltas == []
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p), n
    forced = se.edit(model, byte_tok, reqs[:1], make().replace(skip_if_predicted=False))
    assert forced.skipped == [False] and forced.deltas
    forced.undo()


@pytest.mark.parametrize("make", ALL, ids=["SGD", "ADAM", "FT", "FT_L"])
def test_deterministic_and_patch_roundtrip(make, byte_tok, tmp_path):
    model = tiny_model("gpt2")
    hp = make().replace(skip_if_predicted=False)
    a = se.get_algorithm(type(hp).ALG_NAME).compute(model, byte_tok, se.make_requests(REQ), hp)
    b = se.get_algorithm(type(hp).ALG_NAME).compute(model, byte_tok, se.make_requests(REQ), hp)
    for x, y in zip(a.deltas, b.deltas):
        assert torch.equal(x.dense, y.dense)
    res = se.edit(model, byte_tok, REQ, hp)
    edited = {n: p.detach().clone() for n, p in model.state_dict().items()}
    path = res.save_patch(tmp_path / "p.safetensors")
    res.undo()
    applied = se.apply_patch(model, path)
    for n, p in model.state_dict().items():
        assert torch.equal(edited[n], p), n
    applied.undo()


def test_shipped_baseline_hparams_load_and_match_their_folder():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "hparams"
    files = [p for alg in ("SGD", "ADAM", "FT", "FT_L") for p in sorted((root / alg).glob("*.yaml"))]
    assert files
    for path in files:
        hp = se.load_hparams(path)
        assert type(hp).ALG_NAME == path.parent.name, path
        assert hp.layers and hp.lr > 0
