"""Shared prefixes, head-only-where-needed and re-running only edited blocks give the plain results."""

from __future__ import annotations

import pytest
import torch
from _tiny import TINY_CONFIGS, tiny_model

import shift_edit as se
from shift_edit.resume import first_changed_block, record_block_inputs, resume_at
from shift_edit.scoring import ContinuationPlan, length_chunks, logits_at_positions, plan_prefixes, score_token_continuations


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
    recorded = {}

    def rec(k):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            with record_block_inputs(adapter) as seen:
                yield
            recorded[k] = seen

        return ctx()

    before = logits_at_positions(model, seqs, positions, batch_size=2, chunk_context=rec)
    hp = se.ShiftHyperParams(layers=[1], eta=5.0, skip_if_predicted=False)
    result = se.edit(model, byte_tok, {"prompt": "Messi plays for", "target_new": " Paris"}, hp)
    try:
        layer = first_changed_block(adapter, [n.rsplit(".", 1)[0] for n in result.orig_weights])
        assert layer == 1
        full = logits_at_positions(model, seqs, positions, batch_size=2)
        fast = logits_at_positions(model, seqs, positions, batch_size=2,
                                   chunk_context=lambda k: resume_at(adapter, layer, recorded[k][layer]))
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


def test_first_changed_block_outside_blocks_is_none():
    adapter = se.ModelAdapter(tiny_model("gpt2"))
    assert first_changed_block(adapter, ["transformer.h.2.mlp.c_proj", "transformer.h.1.mlp.c_fc"]) == 1
    assert first_changed_block(adapter, ["transformer.h.2.mlp.c_proj", "lm_head"]) is None
    assert first_changed_block(adapter, []) is None
