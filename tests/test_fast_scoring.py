"""Shared prefixes, head-only-where-needed and re-running only edited blocks give the plain results."""

from __future__ import annotations

import pytest
import torch
from _tiny import TINY_CONFIGS, tiny_model

import shift_edit as se
from shift_edit.model.resume import BlockRecorder, Resume, first_edited_block, record_block_inputs
from shift_edit.model.scoring import (
    ContinuationPlan,
    length_chunks,
    logits_at_positions,
    plan_prefixes,
    score_token_continuations,
)


def test_plan_prefixes_by_hand():
    wanted = [[1, 2], [1, 2, 3], [1], [4, 5], [1, 2, 3]]
    plan = plan_prefixes(wanted)
    assert plan.seqs == [[1, 2, 3], [4, 5]]
    assert plan.cover == [0, 0, 0, 1, 0]


def test_continuation_plan_reads_each_position_once():
    pairs = [([7, 8], [9]), ([7, 8], [3, 4]), ([5], [6, 1, 2])]
    plan = ContinuationPlan.build(pairs)
    assert plan.seqs == [[7, 8, 3], [5, 6, 1]]  # longest first, ties in input order
    assert plan.positions == [[1, 2], [0, 1, 2]]
    assert plan.reads == [(0, [0]), (0, [0, 1]), (1, [0, 1, 2])]


def test_length_chunks_bound_padding_and_batch():
    assert length_chunks([10, 10, 9, 3, 3], 64, max_padding=0.2) == [(0, 3), (3, 5)]
    assert length_chunks([5] * 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert length_chunks([], 4) == []


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox", "opt"])
def test_shared_batched_scores_equal_one_pass_per_pair(model_type, byte_tok):
    model = tiny_model(model_type)
    pairs = [(byte_tok.encode(p), byte_tok.encode(t)) for p, t in
             [("ab", " c"), ("ab", " cde"), ("xyz w", " q"), ("ab", " cd"), ("long prompt here", " x y")]]
    fast = score_token_continuations(model, pairs, batch_size=64)
    slow = score_token_continuations(model, pairs, batch_size=1, share_prefixes=False)
    for a, b in zip(fast, slow):
        assert a.target_ids == b.target_ids
        assert torch.allclose(a.token_nll, b.token_nll, atol=1e-5)
        assert torch.equal(a.argmax_ids, b.argmax_ids)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_resume_at_edited_block_equals_full_pass(model_type, byte_tok):
    model = tiny_model(model_type)
    adapter = se.ModelAdapter(model)
    seqs = [byte_tok.encode(s) for s in ("The capital of France is", "Messi plays for", "a b")]
    positions = [[len(s) - 2, len(s) - 1] for s in seqs]
    recorder = BlockRecorder(adapter)  # every block's input, one entry per batch
    before = logits_at_positions(model, seqs, positions, batch_size=2, record=recorder)
    assert len(recorder) == 2
    hp = se.ShiftHyperParams(layers=[1], eta=5.0, skip_if_predicted=False)
    result = se.edit(model, byte_tok, {"prompt": "Messi plays for", "target_new": " Paris"}, hp)
    try:
        assert all(d.layer == adapter.block_of(d.module) for d in result.deltas)  # the layer the deltas carry
        resume = recorder.resume_after(result.deltas)
        assert isinstance(resume, Resume) and resume.block == 1 and len(resume.hidden) == 2
        full = logits_at_positions(model, seqs, positions, batch_size=2)
        fast = logits_at_positions(model, seqs, positions, batch_size=2, resume=resume)
        assert len(adapter.blocks()) == adapter.n_layers  # the block list is restored
    finally:
        result.undo()
    assert any(not torch.allclose(a, b) for a, b in zip(before, full))  # the edit changed something
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_record_stops_at_block(byte_tok):
    model = tiny_model("llama")
    adapter = se.ModelAdapter(model)
    ids = torch.tensor([byte_tok.encode("hello there")])
    with record_block_inputs(adapter, stop_at=1) as seen:
        model(input_ids=ids)
        raise AssertionError("the pass should have stopped")  # pragma: no cover
    assert seen[0] is not None and seen[1] is not None and seen[2] is None


def _delta(adapter, module, layer):
    return se.WeightDelta(module, adapter.layout(adapter.module(module)), dense=torch.zeros(1, 1), layer=layer)


def test_first_edited_block_outside_blocks_is_none():
    adapter = se.ModelAdapter(tiny_model("gpt2"))
    two, one = _delta(adapter, "transformer.h.2.mlp.c_proj", 2), _delta(adapter, "transformer.h.1.mlp.c_fc", 1)
    assert first_edited_block(adapter, [two, one]) == 1
    assert first_edited_block(adapter, [two, _delta(adapter, "lm_head", None)]) is None
    assert first_edited_block(adapter, []) is None


def test_recorder_resumes_only_from_a_kept_block_not_after_the_edit(byte_tok):
    model = tiny_model("llama")
    adapter = se.ModelAdapter(model)
    recorder = BlockRecorder(adapter, 1, stop=True)
    out = logits_at_positions(model, [byte_tok.encode("hello there")], [[3]], record=recorder)
    assert out == [None]  # a stopping recorder ends the pass: no logits
    ff2 = adapter.ff2_name
    assert recorder.resume_after([_delta(adapter, ff2(2), 2)]).block == 1  # blocks 1.. re-run
    assert recorder.resume_after([_delta(adapter, ff2(0), 0)]) is None  # edited before what was kept
    assert recorder.resume_at(2) is None
    with pytest.raises(ValueError, match="give one of them"):
        logits_at_positions(model, [[1, 2]], [[1]], record=recorder, resume=recorder.resume_at(1))
