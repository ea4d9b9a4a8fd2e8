"""AlphaEdit: the closed form, the null-space property on preserved keys and on earlier edits' keys."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.algorithms.locate.alphaedit import AlphaEditHyperParams, alphaedit_factors, null_space_projector
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.covariance import layer_stats
from shift_edit.model.hooks import forward_capture

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
REQS = [{"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": " Rome"}},
        {"prompt": "{} is located in", "subject": "Oslo", "target_new": {"str": " Spain"}}]


def _random_setup(seed=0, d=20, n0=8):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(d, n0, generator=g, dtype=torch.float64)
    c = k0 @ k0.T / n0
    proj, dim = null_space_projector(c, 1e-9 * float(torch.linalg.eigvalsh(c)[-1]))
    return g, k0, proj, dim


def test_closed_form_equals_the_paper_and_spares_preserved_keys():
    g, k0, proj, dim = _random_setup()
    assert dim == 20 - 8
    k1, kp = torch.randn(20, 2, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64)
    r = torch.randn(6, 2, generator=g, dtype=torch.float64)
    lam = 0.7
    left, right = alphaedit_factors(r, k1, proj, lam, kp)
    delta = left @ right
    # the paper's equation: Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ I)⁻¹
    paper = (
        r
        @ k1.T
        @ proj
        @ torch.linalg.inv(kp @ kp.T @ proj + k1 @ k1.T @ proj + lam * torch.eye(20, dtype=torch.float64))
    )
    assert torch.allclose(delta, paper, atol=1e-10)
    assert delta.norm() > 1e-3
    assert (delta @ k0).norm() <= 1e-9 * delta.norm() * k0.norm()  # preserved keys: outputs unchanged
    # with a vanishing ridge term the earlier edits' keys are spared too, and the new keys get R
    left, right = alphaedit_factors(r, k1, proj, 1e-9, kp)
    delta = left @ right
    assert (delta @ kp).norm() <= 1e-6 * delta.norm() * kp.norm()
    assert torch.allclose(delta @ k1, r, atol=1e-6 * float(r.abs().max()))


def _keys(model, tok, layer, n_tokens):
    """The FF2 input vectors the statistics were built from (the first n_tokens tokens of TEXTS)."""
    name = ModelAdapter(model).ff2_name(layer)
    keys, left = [], n_tokens
    for text in TEXTS:
        ids = tok(text).input_ids[:left]
        left -= len(ids)
        cap, _ = forward_capture(model, torch.tensor([ids]), None, [name])
        keys.append(cap.inputs[name][0].double())
        if left == 0:
            break
    return torch.cat(keys).T  # [d_in, n]


def test_edits_leave_preserved_keys_and_use_the_memory(byte_tok, tmp_path, monkeypatch):
    """On a tiny model whose statistics come from 30 tokens (rank 30 < d_in 48, an exact null space),
    two sequential AlphaEdit edits leave every statistics key's FF2 output unchanged to float precision,
    and the second sees the first's keys in the memory."""
    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    model = tiny_model("llama")
    layers = [0, 1]
    stats = layer_stats(model, byte_tok, layers, corpus=str(corpus), n_tokens=30, max_length=64, progress=False)
    top = max(float(torch.linalg.eigvalsh(stats[x].mom2.double())[-1]) for x in layers)
    hp = AlphaEditHyperParams(layers=layers, v_num_grad_steps=3, context_template_length_params=[[3, 1]],
                              mom2_corpus=str(corpus), mom2_n_tokens=30, mom2_max_length=64,
                              nullspace_threshold=1e-7 * top, L2=1.0, skip_if_predicted=False)
    k0 = {x: _keys(model, byte_tok, x, 30) for x in layers}
    adapter = ModelAdapter(model)
    mem = se.EditMemory()
    for i, req in enumerate(REQS):
        result = se.edit(model, byte_tok, req, hp, memory=mem)
        assert sorted(d.layer for d in result.deltas) == layers
        for d in result.deltas:
            delta = d.canonical().double()
            assert delta.norm() > 0
            assert (delta @ k0[d.layer]).norm() <= 2e-6 * delta.norm() * k0[d.layer].norm()
        assert result.info[0]["layers"][0]["memory_keys"] == i  # the earlier edit's key, per layer
        assert result.info[0]["layers"][0]["null_space_dim"] == 48 - 30
    assert len(mem) == 2 * len(layers)
    assert mem.params() == sorted(f"{adapter.ff2_name(x)}.weight" for x in layers)
    with pytest.raises(se.ShiftEditError, match="L2"):
        AlphaEditHyperParams(layers=[0], L2=0)


def test_shipped_alphaedit_hparams_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "hparams" / "AlphaEdit").glob("*.yaml")):
        hp = se.load_hparams(path)
        assert isinstance(hp, AlphaEditHyperParams) and hp.L2 > 0 and hp.nullspace_threshold > 0, path
