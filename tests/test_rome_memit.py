"""Covariance statistics, ROME and MEMIT on tiny models (plus one SmolLM2 efficacy check)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import CORPUS_TEXTS as TEXTS  # conftest's corpus fixture writes these
from _tiny import tiny_model

import shift_edit
from shift_edit.algorithms.locate import memit as memit_mod
from shift_edit.algorithms.locate import rome as rome_mod
from shift_edit.algorithms.locate import zstar as zstar_mod
from shift_edit.algorithms.locate.memit import MEMITHyperParams
from shift_edit.algorithms.locate.rome import ROMEHyperParams
from shift_edit.algorithms.locate.zstar import canonical_weight
from shift_edit.core.requests import make_request
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.covariance import layer_stats
from shift_edit.model.hooks import forward_capture

REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": "Rome"}}


class _Counter:
    def __init__(self, model):
        self.n = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def _explicit_mom2(model, tok, layer, n_tokens, max_length):
    name = ModelAdapter(model).ff2_name(layer)
    keys, left = [], n_tokens
    for text in TEXTS:
        ids = tok(text).input_ids[:max_length][:left]
        left -= len(ids)
        cap, _ = forward_capture(model, torch.tensor([ids]), None, [name])
        keys.append(cap.inputs[name][0].double())
        if left == 0:
            break
    k = torch.cat(keys)
    return k.T @ k / k.shape[0], k.shape[0]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_second_moment_equals_explicit(model_type, byte_tok, corpus):
    model = tiny_model(model_type)
    stats = layer_stats(model, byte_tok, [0, 2], corpus=corpus, n_tokens=150, max_length=40,
                        dtype="float64", progress=False, batch_tokens=64)
    for layer in (0, 2):
        want, n = _explicit_mom2(model, byte_tok, layer, 150, 40)
        assert stats[layer].n_tokens == n == 150
        assert stats[layer].meta["max_length"] == 40 and stats[layer].meta["dtype"] == "float64"
        assert torch.allclose(stats[layer].mom2, want, rtol=1e-6, atol=1e-8)


def test_stats_cache_reused_and_rebuilt(byte_tok, corpus):
    model = tiny_model("llama")
    count = _Counter(model)
    kw = dict(corpus=corpus, n_tokens=100, max_length=32, progress=False)
    first = layer_stats(model, byte_tok, [1], **kw)[1]
    built = count.n
    assert built > 0
    again = layer_stats(model, byte_tok, [1], **kw)[1]
    assert count.n == built  # no forward pass: read from the cache
    assert torch.equal(again.mom2, first.mom2)
    pt = next(p for p in (shift_edit.model.loading.cache_dir() / "stats").rglob("*.pt"))
    meta_path = pt.with_suffix(".json")

    # corrupt tensor file -> checksum mismatch -> rebuilt, never used
    data = bytearray(pt.read_bytes())
    data[-20] ^= 0xFF
    pt.write_bytes(bytes(data))
    rebuilt = layer_stats(model, byte_tok, [1], **kw)[1]
    assert count.n > built and torch.equal(rebuilt.mom2, first.mom2)

    # mismatched metadata (e.g. another model fingerprint written into it) -> rebuilt
    built = count.n
    meta = json.loads(meta_path.read_text())
    meta["model_fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    layer_stats(model, byte_tok, [1], **kw)
    assert count.n > built

    # a different sample count is a different cache entry
    built = count.n
    other = layer_stats(model, byte_tok, [1], **{**kw, "n_tokens": 60})[1]
    assert count.n > built and other.n_tokens == 60
    # a different model (weights) does not reuse the entry
    model2 = tiny_model("llama", seed=1)
    c2 = _Counter(model2)
    layer_stats(model2, byte_tok, [1], **kw)
    assert c2.n > 0


def test_stats_read_once_per_process_and_solve(byte_tok, corpus, monkeypatch):
    from shift_edit.model import covariance

    model = tiny_model("llama")
    kw = dict(corpus=corpus, n_tokens=100, max_length=32, progress=False)
    built = layer_stats(model, byte_tok, [1], **kw)[1]
    reads = []
    real = covariance._try_load
    monkeypatch.setattr(covariance, "_try_load", lambda *a, **k: reads.append(a) or real(*a, **k))
    again = layer_stats(model, byte_tok, [1], **kw)[1]
    assert again is built and not reads  # validated entry reused without reading the file again
    pt = next(p for p in (shift_edit.model.loading.cache_dir() / "stats").rglob("*.pt"))
    pt.write_bytes(pt.read_bytes())  # touched file (new mtime): read and checked again
    layer_stats(model, byte_tok, [1], **kw)
    assert len(reads) == 1
    rhs = torch.randn(built.mom2.shape[0], 3, dtype=torch.float64)
    want = torch.linalg.solve(built.mom2.double(), rhs)
    assert torch.allclose(built.solve(rhs), want, rtol=1e-6, atol=1e-8)
    assert torch.allclose(built.solve(rhs[:, 0]), want[:, 0], rtol=1e-6, atol=1e-8)


def _capture_optimise(monkeypatch, module):
    seen = []
    real = zstar_mod.optimise_delta

    def wrapper(*a, **k):
        out = real(*a, **k)
        seen.append(out)
        return out

    monkeypatch.setattr(module, "optimise_delta", wrapper)
    return seen


def _rome_hp(**kw):
    base = dict(layers=[1], v_num_grad_steps=4, context_template_length_params=[[3, 2]],
                mom2_n_tokens=200, mom2_max_length=40, skip_if_predicted=False)
    return ROMEHyperParams(**{**base, **kw})


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rome_update_maps_key_to_value(model_type, byte_tok, corpus, monkeypatch):
    model = tiny_model(model_type)
    hp = _rome_hp(mom2_corpus=corpus, lambda_key="mean", max_relative_norm=None)
    seen = _capture_optimise(monkeypatch, rome_mod)
    adapter = ModelAdapter(model)
    ff2 = adapter.ff2(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    computed = rome_mod.compute_rome(model, byte_tok, [make_request(REQ)], hp)
    for k, v in model.state_dict().items():  # compute leaves the weights unchanged
        assert torch.equal(v, before[k]), k
    (delta,) = computed.deltas
    assert delta.rank == 1 and delta.left.shape[1] == 1 and delta.right.shape[0] == 1
    dr = seen[0]
    assert dr.keys.shape[0] == 3  # bare prompt + 2 generated contexts
    W = canonical_weight(ff2).double()
    dW = delta.canonical().double()
    k_star = dr.keys.mean(0).double()
    v_star = W @ k_star + dr.delta.double()
    assert torch.allclose((W + dW) @ k_star, v_star, rtol=1e-4, atol=1e-4 * float(v_star.norm()))
    # keys orthogonal to C^-1 k* in the C metric are untouched
    C = layer_stats(model, byte_tok, [1], corpus=corpus, n_tokens=200, max_length=40, progress=False)[1].mom2.double()
    u = torch.linalg.solve(C, k_star)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        k = torch.randn(k_star.shape[0], generator=g, dtype=torch.float64)
        k_perp = k - (u @ k) / (u @ u) * u  # k_perpᵀ C⁻¹ k* = 0
        assert float((dW @ k_perp).norm()) < 1e-5 * float(dW.norm()) * float(k_perp.norm())
    # the applied edit changes FF2 by exactly this delta, and undo is exact
    result = shift_edit.edit(model, byte_tok, REQ, hp)
    assert not result.skipped[0]
    result.undo()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rome_through_update_hook_is_the_rank_one_edit(model_type, byte_tok, corpus, monkeypatch):
    """optimise_through_update trains δ with the hook that adds δ·uᵀx/uᵀk* everywhere: that
    hook gives the same outputs as the returned weight update, which still maps k* to v*."""
    model = tiny_model(model_type)
    seen = _capture_optimise(monkeypatch, rome_mod)
    hp = _rome_hp(mom2_corpus=corpus, optimise_through_update=True, lambda_key="mean")
    (delta,) = rome_mod.compute_rome(model, byte_tok, [make_request(REQ)], hp).deltas
    dr = seen[0]
    k_star = dr.keys.mean(0)
    u = delta.right[0]
    ff2 = ModelAdapter(model).ff2(1)
    ids = torch.tensor([byte_tok("Messi plays for a club").input_ids])
    hook = zstar_mod._AddThrough(u, 1.0 / float(u @ k_star))
    hook.delta = dr.delta
    handle = ff2.register_forward_hook(hook)
    try:
        hooked = model(input_ids=ids).logits
    finally:
        handle.remove()
    from shift_edit.studies.common import temporarily_applied

    with temporarily_applied(model, [delta]):
        edited = model(input_ids=ids).logits
    assert torch.allclose(hooked, edited, atol=1e-4, rtol=1e-4)
    W = canonical_weight(ff2).double()
    v_star = W @ k_star.double() + dr.delta.double()
    assert torch.allclose((W + delta.canonical().double()) @ k_star.double(), v_star, atol=1e-4 * float(v_star.norm()))
    assert dr.steps >= 1 and not torch.equal(hooked, model(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rome_lambda_from_prompt_key_gives_the_prompt_exactly_delta(model_type, byte_tok, corpus, monkeypatch):
    """lambda_key: prompt (ROME's reference code) keeps u = C⁻¹k* from the context mean but
    scales Λ by the bare prompt's key, so that prompt's FF2 output moves by exactly δ; with
    lambda_key: mean (the paper's equation) the mean key moves by δ. Both share u."""
    model = tiny_model(model_type)
    seen = _capture_optimise(monkeypatch, rome_mod)
    req = [make_request(REQ)]
    (d_mean,) = rome_mod.compute_rome(model, byte_tok, req, _rome_hp(mom2_corpus=corpus, lambda_key="mean")).deltas
    (d_prompt,) = rome_mod.compute_rome(model, byte_tok, req, _rome_hp(mom2_corpus=corpus)).deltas
    assert _rome_hp().lambda_key == "prompt"  # the default, as in ROME's reference code
    dr = seen[1]
    assert torch.equal(seen[0].delta, dr.delta)  # same δ (deterministic, no through-update)
    assert torch.allclose(d_mean.right, d_prompt.right, atol=1e-6)
    k_prompt = dr.bare_key.double()
    assert torch.equal(dr.bare_key, dr.keys[0])
    got = d_prompt.canonical().double() @ k_prompt
    assert torch.allclose(got, dr.delta.double(), atol=1e-4 * float(dr.delta.norm()))
    ratio = float(d_prompt.right[0].double() @ dr.keys.mean(0).double()) / float(d_prompt.right[0].double() @ k_prompt)
    assert torch.allclose(d_prompt.canonical().double() @ dr.keys.mean(0).double(), ratio * dr.delta.double(),
                          atol=1e-4 * float(dr.delta.norm()))
    with pytest.raises(shift_edit.ShiftEditError, match="lambda_key"):
        ROMEHyperParams.from_dict({"layers": [1], "lambda_key": "first"})


def test_rome_without_covariance_uses_the_key(byte_tok, corpus, monkeypatch):
    model = tiny_model("llama")
    seen = _capture_optimise(monkeypatch, rome_mod)
    computed = rome_mod.compute_rome(
        model, byte_tok, [make_request(REQ)], _rome_hp(mom2_adjustment=False, mom2_corpus=corpus)
    )
    k_star = seen[0].keys.mean(0)
    right = computed.deltas[0].right[0]
    assert torch.allclose(right, k_star / k_star.norm(), atol=1e-6)
    assert not (shift_edit.model.loading.cache_dir() / "stats").exists()  # no statistics were needed


def test_rome_hparams_validation():
    with pytest.raises(shift_edit.ShiftEditError, match="exactly one layer"):
        ROMEHyperParams(layers=[1, 2])
    with pytest.raises(shift_edit.ShiftEditError, match="clamp_norm_factor"):
        ROMEHyperParams(layers=[1], clamp_norm_factor=0)
    with pytest.raises(shift_edit.ShiftEditError, match="mom2_dtype"):
        ROMEHyperParams(layers=[1], mom2_dtype="float16")


def test_memit_one_layer_matches_closed_form(byte_tok, corpus, monkeypatch):
    model = tiny_model("llama")
    lam = 50.0
    hp = MEMITHyperParams(layers=[1], v_num_grad_steps=4, context_template_length_params=[[3, 2]],
                          mom2_n_tokens=200, mom2_max_length=40, mom2_corpus=corpus,
                          mom2_update_weight=lam, skip_if_predicted=False)
    seen = _capture_optimise(monkeypatch, zstar_mod)
    req = make_request(REQ)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    computed = memit_mod.compute_memit(model, byte_tok, [req], hp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    (delta,) = computed.deltas
    assert delta.rank == 1
    dr = seen[0]
    C = layer_stats(model, byte_tok, [1], corpus=corpus, n_tokens=200, max_length=40, progress=False)[1].mom2.double()
    keys = dr.keys.double().cpu()  # the same contexts: the bare prompt, then one type of 2 (key_average: per_type)
    k = (keys[0] + keys[1:].mean(0)) / 2
    r = dr.delta.double().cpu()  # one layer: the whole residual z* - h, with h unchanged
    ck = torch.linalg.solve(C, k)
    closed = torch.outer(r, ck) / (lam + k @ ck)  # r kᵀ (λC + k kᵀ)⁻¹ (Sherman-Morrison)
    assert torch.allclose(delta.canonical().double(), closed, rtol=1e-4, atol=1e-6 * float(closed.abs().max()))


def test_memit_batch_factors_and_undo(byte_tok, corpus):
    model = tiny_model("gpt2")
    hp = MEMITHyperParams(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[3, 1]],
                          mom2_n_tokens=200, mom2_max_length=40, mom2_corpus=corpus,
                          mom2_update_weight=10.0, skip_if_predicted=False, max_relative_norm=None)
    reqs = [REQ, {"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "Spain"}}]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = shift_edit.edit(model, byte_tok, reqs, hp)
    assert sorted(d.layer for d in result.deltas) == [0, 1]
    assert all(d.dense is None and d.rank == 2 for d in result.deltas)  # factors, rank <= N
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    result.undo()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(shift_edit.ShiftEditError, match="last layer"):
        shift_edit.edit(model, byte_tok, REQ, hp.replace(layers=[2]))


def test_stats_cli(byte_tok, corpus, capsys, tmp_path, monkeypatch):
    from shift_edit.cli import main

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    argv = ["stats", "--model", str(folder), "--layer", "0", "--layer", "2", "--corpus", corpus, "--n-tokens", "80",
            "--max-length", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "layer 0:" in out and "layer 2:" in out and "tokens=80" in out
    assert len(list((shift_edit.model.loading.cache_dir() / "stats").rglob("*.pt"))) == 2
    # --hparams: the statistics an hparams file reads, then reused by the edit (no second pass)
    hp_file = tmp_path / "memit.yaml"
    hp_file.write_text(f"alg_name: MEMIT\nlayers: [0, 1]\nmom2_corpus: {corpus}\nmom2_n_tokens: 90\n"
                       "mom2_max_length: 30\nv_num_grad_steps: 2\ncontext_template_length_params: [[3, 1]]\n")
    assert main(["stats", "--model", str(folder), "--hparams", str(hp_file)]) == 0
    out = capsys.readouterr().out
    assert "layer 0:" in out and "layer 1:" in out and "tokens=90" in out and "layer 2:" not in out
    assert len(list((shift_edit.model.loading.cache_dir() / "stats").rglob("*.pt"))) == 4
    assert main(["stats", "--model", str(folder)]) == 2  # nothing to compute: one clear message
    assert "--layer" in capsys.readouterr().err


@pytest.mark.slow  # ~1 min alone on 2 CPU cores (10 min when the machine is shared)
def test_rome_makes_fact_top1_on_smollm2(smollm2, tmp_path, monkeypatch):
    from shift_edit.model.corpus import default_corpus
    from shift_edit.model.scoring import score_continuations

    if not default_corpus().endswith(".raw"):
        pytest.skip("local WikiText copy not found (set SHIFT_EDIT_DATA)")
    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(tmp_path))
    model, tok = smollm2
    torch.manual_seed(0)
    hp = ROMEHyperParams(layers=[8], context_template_length_params=[[5, 2]], v_num_grad_steps=15,
                         mom2_n_tokens=3000, mom2_max_length=64, skip_if_predicted=False)
    req = {"prompt": "{} is a native speaker of", "subject": "Danielle Darrieux", "target_new": {"str": "English"}}
    r = make_request(req)
    assert not score_continuations(model, tok, [r.text], [r.target_new])[0].all_correct
    result = shift_edit.edit(model, tok, req, hp)
    try:
        assert score_continuations(model, tok, [r.text], [r.target_new])[0].all_correct
    finally:
        result.undo()


def test_memit_zstar_cache_gives_the_same_batch_with_each_zstar_optimised_once(byte_tok, corpus, monkeypatch):
    model = tiny_model("llama")
    hp = MEMITHyperParams(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[3, 2]],
                          mom2_n_tokens=200, mom2_max_length=40, mom2_corpus=corpus, skip_if_predicted=False,
                          mom2_update_weight=50.0)
    reqs = [make_request(REQ), make_request({"prompt": "{} lives in", "subject": "Totti",
                                             "target_new": {"str": "Oslo"}})]
    plain = memit_mod.compute_memit(model, byte_tok, reqs, hp)
    seen = _capture_optimise(monkeypatch, zstar_mod)
    cached_hp = hp.replace(zstar_cache=True)
    memit_mod.compute_memit(model, byte_tok, reqs[:1], cached_hp)  # fills the cache for the first request
    assert len(seen) == 1
    batch = memit_mod.compute_memit(model, byte_tok, reqs, cached_hp)
    assert len(seen) == 2  # only the second request's z* was optimised
    assert batch.info[0]["zstar_from_cache"] and "zstar_from_cache" not in batch.info[1]
    for a, b in zip(plain.deltas, batch.deltas):
        assert torch.allclose(a.canonical(), b.canonical(), atol=1e-6)
    # another z* hparam is another entry; a corrupt entry is recomputed
    memit_mod.compute_memit(model, byte_tok, reqs[:1], cached_hp.replace(v_lr=0.1))
    assert len(seen) == 3
    for p in (shift_edit.model.loading.cache_dir() / "zstar").rglob("*.pt"):
        p.write_bytes(b"broken")
    memit_mod.compute_memit(model, byte_tok, reqs[:1], cached_hp)
    assert len(seen) == 4
