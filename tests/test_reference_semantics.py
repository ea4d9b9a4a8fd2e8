"""ROME, MEMIT and AlphaEdit follow the reference code's semantics (issue 36): context lengths count the prefix,
``v_num_grad_steps = n`` takes n - 1 steps, MEMIT's keys are averaged per context type; the earlier variants are
options. The oracle: with fixed templates and fixed statistics, our ROME's and MEMIT's ΔW equal a re-derivation of
the equations written here from the papers (ROME: Meng et al. 2022, eq. 2-4 and the v* loop; MEMIT: Meng et al.
2023, eq. 14-16 and its layer spreading), independent of our batching, caching and module tables."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_model

from shift_edit.algorithms.locate import contexts as ctx_mod
from shift_edit.algorithms.locate import memit as memit_mod
from shift_edit.algorithms.locate import rome as rome_mod
from shift_edit.algorithms.locate import spread as spread_mod
from shift_edit.algorithms.locate.alphaedit import AlphaEditHyperParams
from shift_edit.algorithms.locate.memit import MEMITHyperParams
from shift_edit.algorithms.locate.rome import ROMEHyperParams
from shift_edit.core.errors import ShiftEditError
from shift_edit.core.requests import make_request
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.covariance import SecondMoment

FACTS = [{"prompt": "{} plays for", "subject": "Messi", "target_new": " Rome"},
         {"prompt": "The home of {} is", "subject": "Ann Lee", "target_new": " Oslo"}]
#: fixed contexts: the bare prompt, two of one type, one of another ([[3, 2], [5, 1]] -> groups [1, 2, 1])
TEMPLATES = ["{}", "A cat sat. {}", "Yes. {}", "Then the sun rose. {}"]
LENGTHS = [[3, 2], [5, 1]]


# --- the reference semantics, option by option --------------------------------------------------------------
class _RecordingTok:
    """The byte tokenizer, recording the ids each decoded text had."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, []

    def __call__(self, *a, **k):
        return self.tok(*a, **k)

    def decode(self, ids, **k):
        self.decoded.append(list(ids))
        return self.tok.decode(ids, **k)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_total_length_counts_the_prefix_and_stops_at_the_longest(byte_tok):
    model = tiny_model("llama")
    rec = _RecordingTok(byte_tok)
    # byte tokens: The 3, Therefore 9, Because 7, I 1, You 3: with 12 tokens in all each gets 12 - its own
    out = ctx_mod.context_templates(model, rec, [[12, 5]], 0, "total")
    assert len(out) == 6 and out[0] == "{}" and all(t.endswith(". {}") for t in out[1:])
    assert [len(ids) for ids in rec.decoded] == [12] * 5
    for prefix, ids in zip(ctx_mod.GEN_PREFIXES, rec.decoded):
        assert ids[:len(prefix)] == byte_tok(prefix).input_ids
    # as generate_fast: nothing is generated once the longest prefix (Therefore, 9) reaches the length
    rec.decoded.clear()
    short = ctx_mod.context_templates(model, rec, [[9, 5]], 0, "total")
    assert short[1:] == [p + ". {}" for p in ctx_mod.GEN_PREFIXES]
    # "new": the length is new tokens (the earlier behaviour, kept for SHIFT_SUBJECT); deterministic per seed
    rec.decoded.clear()
    ctx_mod.context_templates(model, rec, [[4, 5]], 0, "new")
    assert [len(ids) for ids in rec.decoded] == [len(byte_tok(p).input_ids) + 4 for p in ctx_mod.GEN_PREFIXES]
    again = ctx_mod.context_templates(tiny_model("llama"), byte_tok, [[12, 5]], 0, "total")
    assert again == out
    assert ctx_mod.context_templates(tiny_model("llama"), byte_tok, [[12, 5]], 1, "total") != out


def test_defaults_are_the_reference_and_bad_modes_are_refused():
    for cls in (ROMEHyperParams, MEMITHyperParams, AlphaEditHyperParams):
        hp = cls(layers=[1])
        assert hp.context_length_mode == "total" and hp.v_step_count == "n_minus_1"
    assert MEMITHyperParams(layers=[1]).key_average == "per_type" == AlphaEditHyperParams(layers=[1]).key_average
    for field, bad in (("context_length_mode", "prompt"), ("v_step_count", "all"), ("key_average", "mean")):
        with pytest.raises(ShiftEditError, match=field):
            MEMITHyperParams.from_dict({"layers": [1], field: bad})
    assert ctx_mod.template_groups([[5, 10], [10, 10]]) == [1, 10, 10]
    assert ctx_mod.template_groups([[5, 0], [10, 5]]) == [1, 5]


@pytest.fixture
def fixed(monkeypatch, byte_tok):
    """Fixed templates and fixed second moments (a random SPD matrix per layer) for ROME and MEMIT."""
    def templates(_model, _tok, hp):
        assert hp.context_template_length_params == LENGTHS
        return list(TEMPLATES)

    cov: dict[int, torch.Tensor] = {}

    def stats(model, _tok, layers, **_kw):
        for layer in layers:
            if layer not in cov:
                d = _w(_ff2(model, layer)).shape[1]
                g = torch.Generator().manual_seed(100 + layer)
                a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
                cov[layer] = (a @ a.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)).float().double()
        return {layer: SecondMoment(layer, cov[layer].float(), {"n_tokens": 1000}) for layer in layers}

    for mod in (rome_mod, memit_mod):
        monkeypatch.setattr(mod, "templates_for", templates)
        monkeypatch.setattr(mod, "layer_stats", stats)
    return cov


@pytest.mark.parametrize("mode, steps", [("n_minus_1", 3), ("n", 4)])
def test_v_step_count(mode, steps, byte_tok, fixed, monkeypatch):
    model = tiny_model("llama")
    seen = []
    real = rome_mod.optimise_delta
    monkeypatch.setattr(rome_mod, "optimise_delta", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    hp = _rome_hp(v_step_count=mode, loss_stop=0.0)
    rome_mod.compute_rome(model, byte_tok, [make_request(FACTS[0])], hp)
    assert seen[0].steps == steps and len(seen[0].losses) == 4
    if mode == "n_minus_1":  # the same δ as 3 steps with nothing after the last
        rome_mod.compute_rome(model, byte_tok, [make_request(FACTS[0])], hp.replace(v_num_grad_steps=3,
                                                                                    v_step_count="n"))
        assert torch.equal(seen[0].delta, seen[1].delta)


def test_memit_keys_per_type_then_across(byte_tok):
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    reqs = [make_request(f) for f in FACTS]
    groups = ctx_mod.template_groups(LENGTHS)
    k_types, _ = spread_mod._keys_and_residual(model, byte_tok, adapter, 1, 1, reqs, TEMPLATES, "subject_last", groups)
    k_flat, _ = spread_mod._keys_and_residual(model, byte_tok, adapter, 1, 1, reqs, TEMPLATES, "subject_last")
    each = [spread_mod._keys_and_residual(model, byte_tok, adapter, 1, 1, reqs, [t],
                                          "subject_last")[0] for t in TEMPLATES]
    want = (each[0] + (each[1] + each[2]) / 2 + each[3]) / 3
    assert torch.allclose(k_types, want, atol=1e-6) and torch.allclose(k_flat, sum(each) / 4, atol=1e-6)
    assert not torch.allclose(k_types, k_flat, atol=1e-3)
    with pytest.raises(ShiftEditError, match="context groups"):
        spread_mod._keys_and_residual(model, byte_tok, adapter, 1, 1, reqs, TEMPLATES, "subject_last", [1, 2])


# --- the oracle: the reference equations, written from the papers ------------------------------------------
def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _ff2(model, layer):
    mlp = _blocks(model)[layer].mlp
    return mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj


def _w(module) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def _sequence(tok, template: str, fact: dict):
    """Token ids of the context's prompt, the subject's last token's index, and the target's ids."""
    prompt = template.replace("{}", fact["prompt"], 1)
    head = prompt[:prompt.index("{}")]
    text = prompt.replace("{}", fact["subject"], 1)
    ids = tok(text).input_ids
    target = tok(text + fact["target_new"]).input_ids[len(ids):]
    return ids, len(tok(head + fact["subject"]).input_ids) - 1, target


def _run(model, ids, site, at: int, add: torch.Tensor | None, capture: str | None = None):
    """Logits of one unpadded sequence with ``add`` added to ``site``'s output at position ``at``; the site's input
    or output at ``at`` is captured when ``capture`` is "in"/"out"."""
    got = {}

    def hook(_m, args, out):
        tensor = out[0] if isinstance(out, tuple) else out
        if capture == "in":
            got["v"] = args[0][0, at].detach()
        if add is not None:
            tensor = tensor.clone()
            tensor[0, at] = tensor[0, at] + add.to(tensor.dtype)
        if capture == "out":
            got["v"] = tensor[0, at].detach()
        return (tensor, *out[1:]) if isinstance(out, tuple) else tensor

    handle = site.register_forward_hook(hook)
    try:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        handle.remove()
    return logits, got.get("v")


def _oracle_delta(model, tok, site, fact, hp) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ, the original vector m at the bare prompt): Adam on NLL + kl_factor·KL(edited ‖ original) at
    "{subject} is a" + v_weight_decay·‖δ‖/‖m‖², the loop of the reference code (n losses, n - 1 steps, stop below
    loss_stop), ‖δ‖ clamped to clamp_norm_factor·‖m‖ after each step; one unpadded forward per context."""
    seqs = [_sequence(tok, t, fact) for t in TEMPLATES]
    kl_ids = tok(f"{fact['subject']} is a").input_ids
    kl_at = len(tok(fact["subject"]).input_ids) - 1
    with torch.no_grad():
        _, m = _run(model, seqs[0][0], site, seqs[0][1], None, capture="out")
        kl_init = torch.log_softmax(_run(model, kl_ids, site, kl_at, None)[0][kl_at].double(), -1)
    delta = torch.zeros(m.shape[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    for p in model.parameters():
        p.requires_grad_(False)
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        nlls = []
        for ids, at, target in seqs:
            logits, _ = _run(model, ids + target[:-1], site, at, delta)
            logp = torch.log_softmax(logits[len(ids) - 1:].double(), -1)
            nlls.append(-logp[torch.arange(len(target)), target].mean())
        kl_logp = torch.log_softmax(_run(model, kl_ids, site, kl_at, delta)[0][kl_at].double(), -1)
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
        loss = torch.stack(nlls).mean() + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / m.norm() ** 2
        if loss.item() < hp.loss_stop or it == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > hp.clamp_norm_factor * m.norm():
                delta.mul_(hp.clamp_norm_factor * m.norm() / delta.norm())
    for p in model.parameters():
        p.requires_grad_(True)
    return delta.detach().double(), m.double()


def _oracle_keys(model, tok, layer, fact) -> torch.Tensor:
    """FF2 inputs at the subject's last token, one row per context (row 0: the bare prompt), rounded to float32 as
    ours are (the reference keeps them in the model's dtype): with a bare-prompt key nearly orthogonal to ``u``,
    ``Λ = δ / uᵀk`` would otherwise turn that rounding into a relative 1e-5."""
    with torch.no_grad():
        return torch.stack([_run(model, ids, _ff2(model, layer), at, None, capture="in")[1]
                            for ids, at, _t in (_sequence(tok, t, fact) for t in TEMPLATES)]).float().double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _rome_hp(**kw) -> ROMEHyperParams:
    # v_weight_decay 1e-4: the tiny models' FF2 outputs have norms of 0.003-0.03, so ROME's 0.5 · ‖δ‖/‖m‖² would
    # be a loss of ~500 whose clamped steps amplify float32 rounding (δ's dtype in both) to a relative 2e-5; with
    # 1e-4 the target's NLL leads, δ still reaches the clamp, and ours and the oracle agree to ~1e-6
    base = dict(layers=[1], v_num_grad_steps=4, v_weight_decay=1e-4, context_template_length_params=LENGTHS,
                skip_if_predicted=False, max_relative_norm=None)
    return ROMEHyperParams(**{**base, **kw})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_equals_the_reference_equations(arch, byte_tok, fixed):
    """ROME's reference: u = C⁻¹k* / ‖C⁻¹k*‖ with k* the mean key over all contexts; Λ = δ / uᵀk_prompt (the
    bare prompt's key: its FF2 output then moves by δ, v* − W k_prompt); ΔW = Λ uᵀ."""
    model = tiny_model(arch).double()
    hp = _rome_hp()
    ours = rome_mod.compute_rome(model, byte_tok, [make_request(FACTS[0])], hp).deltas[0].canonical()
    delta, _m = _oracle_delta(model, byte_tok, _ff2(model, 1), FACTS[0], hp)
    keys = _oracle_keys(model, byte_tok, 1, FACTS[0])
    u = torch.linalg.solve(fixed[1], keys.mean(0))
    u = u / u.norm()
    want = torch.outer(delta / (u @ keys[0]), u)
    assert _relative(ours, want) <= 1e-5
    # the earlier variant (n steps) is measurably another update
    other = rome_mod.compute_rome(model, byte_tok, [make_request(FACTS[0])], hp.replace(v_step_count="n"))
    assert _relative(other.deltas[0].canonical(), want) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memit_equals_the_reference_equations(arch, byte_tok, fixed):
    """MEMIT's reference for a batch: z*_i = h_i + δ_i at the residual after the last edited layer L (δ fitted as
    ROME's v* but clamped by ‖h_i‖); then for each layer l_j in order, with the earlier layers' updates applied:
    keys k_i averaged within each context type and then across types, R = (z* − h) / (L − j) from the current h,
    ΔW = R Kᵀ (λC + K Kᵀ)⁻¹."""
    model = tiny_model(arch).double()
    layers, lam = [0, 1], 50.0
    hp = MEMITHyperParams(layers=layers, v_num_grad_steps=4, v_weight_decay=1e-4,
                          context_template_length_params=LENGTHS,
                          mom2_update_weight=lam, skip_if_predicted=False, max_relative_norm=None)
    ours = memit_mod.compute_memit(model, byte_tok, [make_request(f) for f in FACTS], hp).deltas
    ours = {d.layer: d.canonical() for d in ours}
    flat = memit_mod.compute_memit(model, byte_tok, [make_request(f) for f in FACTS], hp.replace(key_average="flat"))
    flat = {d.layer: d.canonical() for d in flat.deltas}

    block = _blocks(model)[layers[-1]]
    z = []
    for fact in FACTS:
        delta, h = _oracle_delta(model, byte_tok, block, fact, hp)
        z.append(h + delta)
    z = torch.stack(z)  # [N, d]
    originals = {layer: _w(_ff2(model, layer)).detach().clone() for layer in layers}
    try:
        for j, layer in enumerate(layers):
            per_fact = [_oracle_keys(model, byte_tok, layer, f) for f in FACTS]
            starts = [0, 1, 3, 4]  # the context types of TEMPLATES: [1, 2, 1]
            K = torch.stack([torch.stack([k[a:b].mean(0) for a, b in zip(starts, starts[1:])]).mean(0)
                             for k in per_fact]).T  # [in, N]
            with torch.no_grad():
                bare = [_sequence(byte_tok, "{}", f)[:2] for f in FACTS]
                h = torch.stack([_run(model, ids, block, at, None, capture="out")[1] for ids, at in bare]).double()
            R = (z - h).T / (len(layers) - j)  # [out, N]
            dW = R @ torch.linalg.solve(lam * fixed[layer] + K @ K.T, K).T
            assert _relative(ours[layer], dW) <= 1e-5, layer
            assert _relative(flat[layer], dW) > 1e-3, layer  # the earlier flat key mean is another update
            with torch.no_grad():
                _w(_ff2(model, layer)).add_(dW.to(model.dtype))
    finally:
        with torch.no_grad():
            for layer, w in originals.items():
                _w(_ff2(model, layer)).copy_(w)
