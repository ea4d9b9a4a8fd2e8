"""One statistics policy in the API and the CLI: second moments are those of the unedited model, computed once
and pinned for a sequence of edits, whichever way the edits are made."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_hparams, tiny_model

import shift_edit as se
from shift_edit.files.io import model_fingerprint
from shift_edit.model import corpus as corpus_mod
from shift_edit.model import covariance, stats_pinning
from shift_edit.model.covariance import layer_stats
from shift_edit.model.stats_pinning import pinned_statistics, statistics_fingerprint

REQS = [{"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": " Rome"}},
        {"prompt": "{} is located in", "subject": "Oslo", "target_new": {"str": " Spain"}},
        {"prompt": "{} speaks", "subject": "Totti", "target_new": {"str": " Lima"}}]


@pytest.fixture
def computations(monkeypatch) -> list[list[str]]:
    """Every corpus pass of the statistics: the modules it computed."""
    seen: list[list[str]] = []
    real = covariance.compute_second_moments
    monkeypatch.setattr(covariance, "compute_second_moments", lambda m, t, names, *a,
                        **k: seen.append(list(names)) or real(m, t, names, *a, **k))
    return seen


def _hp(corpus):
    return tiny_hparams("AlphaEdit", corpus, layers=[0, 1], mom2_n_tokens=30, mom2_max_length=32)


def _three_edits(how: str, model, tok, hp) -> None:
    if how == "edit with memory":
        memory = se.EditMemory()
        for req in REQS:
            se.edit(model, tok, req, hp, memory=memory)
    elif how == "apply_to_model loop":
        for req in REQS:
            model, _ = se.apply_alphaedit_to_model(model, tok, [req], hp)
    else:
        editor = se.BaseEditor(hp, model=model, tok=tok)
        editor.edit([r["prompt"].format(r["subject"]) for r in REQS], [r["target_new"]["str"] for r in REQS],
                    subject=[r["subject"] for r in REQS], sequential_edit=True, verbose=False)


@pytest.mark.parametrize("how", ["edit with memory", "apply_to_model loop", "BaseEditor sequential"])
def test_three_sequential_alphaedit_edits_compute_the_statistics_once(how, byte_tok, corpus, computations):
    model = tiny_model("llama")
    unedited = model_fingerprint(model)
    hp = _hp(corpus)
    _three_edits(how, model, byte_tok, hp)
    assert model_fingerprint(model) != unedited  # the edits were kept
    assert computations == [["model.layers.0.mlp.down_proj",
                             "model.layers.1.mlp.down_proj"]]  # one pass, before the first edit
    folders = {p.parent.parent.name for p in (se.model.loading.cache_dir() / "stats").rglob("*.pt")}
    assert folders == {unedited}  # one cache entry per layer, keyed by the unedited model: nothing per edited state
    assert statistics_fingerprint(model) == unedited


def test_statistics_asked_for_after_edits_are_the_unedited_models(byte_tok, corpus, computations):
    """Layers first needed after some edits are computed on the unedited weights (swapped in for the pass,
    bit-exactly back): the same numbers as on a fresh model; undone edits are forgotten."""
    model = tiny_model("llama")
    hp = _hp(corpus)
    results = [se.edit(model, byte_tok, req, hp) for req in REQS[:2]]
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    late = layer_stats(model, byte_tok, [2], corpus=corpus, n_tokens=30, max_length=32, progress=False)[2]
    assert all(torch.equal(p, edited[n]) for n, p in model.named_parameters())
    fresh = tiny_model("llama")
    with pinned_statistics(fresh):
        want = covariance.compute_second_moments(fresh, byte_tok, ["model.layers.2.mlp.down_proj"],
                                                 corpus_mod.open_corpus(corpus), n_tokens=30, max_length=32,
                                                 progress=False)[0]["model.layers.2.mlp.down_proj"]
    assert torch.equal(late.mom2, want)
    for r in reversed(results):
        r.undo()
    assert not stats_pinning.unedited_values(model)  # all undone: nothing held
    assert statistics_fingerprint(model) == model_fingerprint(model)


def test_a_copy_keeps_the_statistics_of_its_unedited_model(byte_tok, corpus, computations):
    model = tiny_model("llama")
    unedited = model_fingerprint(model)
    hp = _hp(corpus)
    se.edit(model, byte_tok, REQS[0], hp)
    copy, _ = se.apply_alphaedit_to_model(model, byte_tok, [REQS[1]], hp, copy=True)
    assert copy is not model and statistics_fingerprint(copy) == unedited and len(computations) == 1
