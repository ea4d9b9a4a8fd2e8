"""Every registered algorithm x every tiny architecture: the invariants each edit must keep.

The matrix is derived from the registry (``algorithm_names()``) and the tiny configs of
``_tiny.TINY_CONFIGS``, so an algorithm is tested here as soon as it registers. For each pair:

- the edit changes the model, and computing it touched nothing else (flags, grads, parameter objects);
- undo restores every tensor bit for bit;
- the saved patch applied to a fresh copy of the base gives the edited weights exactly;
- the LoRA export (full rank where a delta is dense) holds the deltas to float tolerance, and
  applied as a patch it gives the edited weights to float tolerance;
- ``skip_if_predicted``: a request whose target the model already predicts is skipped, and the
  weights stay as they were.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _tiny import TINY_CONFIGS, tiny_hparams, tiny_model, write_corpus

import shift_edit as se
from shift_edit.algorithms.common import already_predicted
from shift_edit.core.registry import algorithm_names, get_algorithm
from shift_edit.files.lora import read_lora

ARCHS = sorted(TINY_CONFIGS)
REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": " Rome"}
#: ends in a space, so the target is the one token "Q"; a subject, for ROME/MEMIT when it is not skipped
SKIP_REQ = {"prompt": "{} is ", "subject": "The capital", "target_new": "Q"}


@pytest.fixture(scope="module")
def matrix_corpus(tmp_path_factory) -> str:
    """One corpus and one statistics cache for the whole matrix: algorithms sharing a layer's
    covariance on an architecture compute it once."""
    folder = tmp_path_factory.mktemp("matrix")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHIFT_EDIT_CACHE", str(folder / "cache"))
        yield write_corpus(folder / "corpus.txt")


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def predicting_model(arch: str, tok) -> torch.nn.Module:
    """A tiny model whose strict top-1 after ``SKIP_REQ``'s prompt is its target: the target's
    unembedding row gets a push along the final hidden state (random tiny models mostly predict
    a space, which no request can ask for)."""
    model = tiny_model(arch)
    ids = torch.tensor([tok(se.make_request(SKIP_REQ).text).input_ids])
    (t,) = tok(SKIP_REQ["target_new"]).input_ids
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        model.get_output_embeddings().weight[t] += 100 * h / h.norm() ** 2
    assert already_predicted(model, tok, se.make_requests([SKIP_REQ])) == [True]
    return model


#: pairs known to fail, with the reason; strict, so a fix shows up as an unexpected pass
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _pairs():
    for alg in algorithm_names():
        for arch in ARCHS:
            reason = KNOWN_FAILURES.get((alg, arch))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            yield pytest.param(alg, arch, marks=marks, id=f"{alg}-{arch}")


@pytest.mark.parametrize("alg, arch", list(_pairs()))
def test_edit_undo_patch_lora_and_skip(alg, arch, byte_tok, matrix_corpus, tmp_path):
    model = tiny_model(arch)
    for p in model.parameters():
        p.grad = None
    model.get_input_embeddings().weight.requires_grad_(False)  # a flag the edit must leave alone
    base = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    hp = tiny_hparams(alg, matrix_corpus)
    torch.manual_seed(0)
    res = se.edit(model, byte_tok, REQ, hp, force=True)
    edited = state(model)
    assert res.deltas and any(not torch.equal(base[n], edited[n]) for n in base), "the edit changed nothing"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    patch = res.save_patch(tmp_path / "p.safetensors")
    dense = [min(d.canonical().shape) for d in res.deltas if d.dense is not None]
    lora = se.export_lora(res, tmp_path / "lora", rank=max(dense) if dense else None)
    res.undo()
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p), f"undo is not bit-exact at {n}"
    assert {n: id(p) for n, p in model.named_parameters()} == ids

    fresh = tiny_model(arch)
    applied = se.apply_patch(fresh, patch, force=True)
    for n, p in fresh.state_dict().items():
        torch.testing.assert_close(p, edited[n], rtol=0, atol=1e-6, msg=f"patch at {n}")
    applied.undo()

    assert set(lora.ranks) == {d.module for d in res.deltas}
    _, adapter = read_lora(tmp_path / "lora")
    want = {d.module: d.canonical() for d in res.deltas}
    for d in adapter:
        scale = float(want[d.module].abs().max())
        torch.testing.assert_close(d.canonical(), want[d.module], rtol=1e-4, atol=1e-5 * scale,
                                   msg=f"LoRA delta of {d.module}")
    applied = se.apply_patch(fresh, tmp_path / "lora", force=True)
    for n, p in fresh.state_dict().items():
        torch.testing.assert_close(p, edited[n], rtol=1e-5, atol=1e-6, msg=f"LoRA applied at {n}")
    applied.undo()

    if "skip_if_predicted" in {f.name for f in dataclasses.fields(get_algorithm(alg).hparams_class)}:
        model = predicting_model(arch, byte_tok)
        base = state(model)
        skipped = se.edit(model, byte_tok, SKIP_REQ, hp.replace(skip_if_predicted=True), force=True)
        assert skipped.skipped == [True]
        for n, p in model.state_dict().items():
            assert torch.equal(base[n], p), f"a skipped request changed {n}"


@pytest.mark.parametrize("alg", algorithm_names())
def test_skip_rule_is_shared_in_a_batch(alg, byte_tok, matrix_corpus):
    """A batch of a predicted and an unpredicted request: the first is skipped, the second edited;
    without ``skip_if_predicted`` the predicted one is edited too."""
    model = predicting_model("llama", byte_tok)
    reqs = [SKIP_REQ, REQ]
    assert already_predicted(model, byte_tok, se.make_requests(reqs)) == [True, False]
    base = state(model)
    hp = tiny_hparams(alg, matrix_corpus, skip_if_predicted=True)
    res = se.edit(model, byte_tok, reqs, hp, force=True)
    assert res.skipped == [True, False] and res.deltas
    res.undo()
    forced = se.edit(model, byte_tok, reqs[:1], hp.replace(skip_if_predicted=False), force=True)
    assert forced.skipped == [False] and forced.deltas
    forced.undo()
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p), n


@pytest.mark.parametrize("alg", algorithm_names())
def test_compute_is_deterministic(alg, byte_tok, matrix_corpus):
    """Same model, request and hparams: the same deltas bit for bit."""
    model = tiny_model("gpt2")
    hp = tiny_hparams(alg, matrix_corpus)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(get_algorithm(alg).compute(model, byte_tok, se.make_requests(REQ), hp).deltas)
    a, b = runs
    assert a and [d.module for d in a] == [d.module for d in b]
    for x, y in zip(a, b):
        assert torch.equal(x.canonical(), y.canonical()), x.module
