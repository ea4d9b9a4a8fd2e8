"""SGD, ADAM, FT and FT_L against hand computations on tiny models (undo, patches, skipping and
determinism of every algorithm: tests/test_algorithm_matrix.py)."""

import pytest
import torch
from _tiny import TINY_CONFIGS, tiny_model

import shift_edit as se
from shift_edit.algorithms.gradient.adam import AdamHyperParams
from shift_edit.algorithms.gradient.ft import FTHyperParams
from shift_edit.algorithms.gradient.ft_l import FTLHyperParams
from shift_edit.algorithms.gradient.sgd import SGDHyperParams

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
    res = se.edit(model, byte_tok, REQ, SGDHyperParams(layers=[1], lr=0.3, matrices=matrices, skip_if_predicted=False,
                                                       max_relative_norm=None))
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
    h1.remove()
    h2.remove()
    (dy,) = torch.autograd.grad(loss, [store["y"]])
    x_n, delta_n = store["x"][0, -1].detach(), dy[0, -1]
    res = se.edit(model, byte_tok, REQ, SGDHyperParams(layers=[0], lr=0.5, grad_positions="target",
                                                       skip_if_predicted=False, max_relative_norm=None))
    canonical = -0.5 * torch.outer(delta_n, x_n)  # [out, in]
    expected = w0 + (canonical.T if model_type == "gpt2" else canonical)
    torch.testing.assert_close(ff2.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(res.deltas[0].canonical()) == 1
    res.undo()
    assert torch.equal(ff2.weight, w0)


def test_sgd_target_positions_equal_full_gradient_at_last_layer(byte_tok):
    model = tiny_model("llama")
    full = se.get_algorithm("SGD").compute(
        model, byte_tok, se.make_requests(REQ), SGDHyperParams(layers=[2], lr=1.0, skip_if_predicted=False)
    )
    tgt = se.get_algorithm("SGD").compute(
        model,
        byte_tok,
        se.make_requests(REQ),
        SGDHyperParams(layers=[2], lr=1.0, grad_positions="target", skip_if_predicted=False),
    )
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
    c = se.get_algorithm("FT_L").compute(
        model, byte_tok, se.make_requests(REQ), FTLHyperParams(norm_constraint=eps, **kw)
    )
    assert all(d.dense.abs().max() <= eps * (1 + 1e-5) for d in c.deltas)
    assert max(float(d.dense.abs().max()) for d in c.deltas) > 0.5 * eps
    u = se.get_algorithm("FT").compute(model, byte_tok, se.make_requests(REQ), FTHyperParams(**kw))
    assert max(float(d.dense.abs().max()) for d in u.deltas) > 2 * eps


def test_ft_lowers_the_target_nll_and_stops_early(byte_tok):
    model = tiny_model("llama")
    before = se.model.scoring.score_continuations(model, byte_tok, ["Messi plays for"], [" Paris"])[0].mean_nll
    stop = before - 0.3  # a random tiny model moves slowly; any threshold below the start works
    res = se.edit(model, byte_tok, REQ, FTHyperParams(layers=[0, 1, 2], matrices="both", lr=5e-2, steps=30,
                                                      max_relative_norm=None,
                                                      early_stop_nll=stop, skip_if_predicted=False))
    after = se.model.scoring.score_continuations(model, byte_tok, ["Messi plays for"], [" Paris"])[0].mean_nll
    assert after < before
    assert res.info[0]["steps"] < 30 and res.info[0]["loss_last"] < stop
    assert after == pytest.approx(res.info[0]["loss_last"], rel=1e-4)
    res.undo()


def test_shipped_hparams_of_step_algorithms_have_layers_and_a_positive_step():
    """Every shipped file of an algorithm with a step size (the registry's step field) names
    its layers and a positive step."""
    from shift_edit.core.shipped_hparams import shipped_hparams_index

    checked = 0
    for alg in se.algorithm_names():
        spec = se.get_algorithm(alg)
        for stem in shipped_hparams_index().get(alg, []) if spec.step_field else []:
            hp = se.load_hparams(spec.shipped_hparams(stem))
            assert type(hp).ALG_NAME == alg, stem
            assert hp.layers and getattr(hp, spec.step_field) > 0, (alg, stem)
            checked += 1
    assert checked


REQ2 = {"prompt": "{} was born in", "subject": "Ann", "target_new": {"str": "Rome"}}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("alg", ["FT", "FT_L"])
def test_ft_from_the_frozen_prefix_equals_full_passes(model_type, alg, byte_tok):
    """Training from the recorded input of the lowest trained block gives the same deltas (bit for bit: the same
    operations on the same inputs), losses and steps as full forward passes (two chunks of one request each, all
    target tokens)."""
    from shift_edit.algorithms.gradient.ft import finetune

    model = tiny_model(model_type)
    kw = dict(layers=[1, 2], lr=1e-2, steps=6, early_stop_nll=0.0, skip_if_predicted=False, batch_size=1,
              target_tokens="all", max_relative_norm=None)
    hp = FTLHyperParams(norm_constraint=5e-3, **kw) if alg == "FT_L" else FTHyperParams(**kw)
    eps = 5e-3 if alg == "FT_L" else None
    reqs = se.make_requests([REQ, REQ2])
    fast = finetune(model, byte_tok, reqs, hp, eps)
    full = finetune(model, byte_tok, reqs, hp, eps, frozen_prefix=False)
    assert fast.info == full.info and fast.info[0]["steps"] == 6
    assert [d.module for d in fast.deltas] == [d.module for d in full.deltas]
    for a, b in zip(fast.deltas, full.deltas):
        assert torch.equal(a.dense, b.dense) and a.dense.abs().max() > 0


def test_ft_falls_back_to_full_passes_when_the_prefix_disagrees(byte_tok, monkeypatch, caplog):
    """A recorded block input that does not reproduce the full pass's loss is dropped at the first step."""
    import shift_edit.algorithms.gradient.ft as ft

    class Corrupted(ft.FrozenPrefix):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.hidden = [h + 1.0 for h in self.hidden]

    model = tiny_model("llama")
    hp = FTHyperParams(layers=[2], lr=1e-2, steps=4, early_stop_nll=0.0, skip_if_predicted=False)
    full = ft.finetune(model, byte_tok, se.make_requests(REQ), hp, frozen_prefix=False)
    monkeypatch.setattr(ft, "FrozenPrefix", Corrupted)
    with caplog.at_level("WARNING"):
        fell_back = ft.finetune(model, byte_tok, se.make_requests(REQ), hp)
    assert "using full passes" in caplog.text
    assert fell_back.info == full.info
    torch.testing.assert_close(fell_back.deltas[0].dense, full.deltas[0].dense, rtol=0, atol=0)
