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


# --- several records' unedited passes in shared batches (issue 33, target 3) --------------------------------

def _records():
    """ROME-format records of different lengths and objects, and one EasyEdit record without neighborhood."""
    objs = [("Paris", "Rome"), ("Oslo", "Berlin"), ("Madrid", "Lisbon"), ("Tokyo", "Seoul"), ("Kyiv", "Riga")]
    recs = []
    for i, (new, true) in enumerate(objs):
        subject = ["Messi", "Ann Lee", "Li", "Jean-Paul Sartre", "Bo"][i]
        recs.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "{} plays for", "subject": subject, "relation_id": "P54",
                                  "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}},
            "paraphrase_prompts": [f"Yes. {subject} plays for", f"Indeed, as everyone knows, {subject} is with"],
            "neighborhood_prompts": ["Totti plays for", f"{true} is the club of", "Pirlo is with", "Zoff"],
        })
    recs.append({"case_id": "ee", "prompt": "Messi plays for", "target_new": "Paris", "subject": "Messi",
                 "ground_truth": "Rome", "rephrase_prompt": "Messi likes"})
    return recs


def _run_cases(model, tok, cases, cfg):
    from shift_edit.bench.prepare import prepare_records
    from shift_edit.bench.runner import RunState, evaluate_batch

    positions = list(range(len(cases)))
    if cfg.score_records == 1:  # the reference path: each record alone
        state = RunState()
        return [evaluate_batch(model, tok, [c], cfg, positions=[p], ppl_lines=None, state=state)[0]
                for c, p in zip(cases, positions)]
    preps = prepare_records(model, tok, cases, positions, cfg)
    state = RunState(resume_exact=True)  # no full-pass check: what is compared is the packed path alone
    return [evaluate_batch(model, tok, [c], cfg, positions=[p], ppl_lines=None, state=state, prepared=[prep])[0]
            for c, p, prep in zip(cases, positions, preps)]


def _assert_same_numbers(packed, alone):
    """Record by record: every decision (ES/PS/NS, strict and first-token top-1) equal, NLLs and KL within 1e-5."""
    assert [r["case_id"] for r in packed] == [r["case_id"] for r in alone]
    for a, b in zip(packed, alone):
        ma, mb = a["metrics"], b["metrics"]
        assert ma["top1_correct"] == mb["top1_correct"]
        for fam in ("top1", "top1_first"):
            assert ma[fam] == mb[fam]
        assert {k: v for k, v in ma["rome"].items() if k.endswith("_success")} == \
            {k: v for k, v in mb["rome"].items() if k.endswith("_success")}
        assert ma["rome"] == pytest.approx(mb["rome"], abs=1e-5)
        assert ma["nll"].keys() == mb["nll"].keys()
        for g in ma["nll"]:
            for x, y in zip(ma["nll"][g], mb["nll"][g], strict=True):
                assert x == pytest.approx(y, abs=1e-5)
        if "neighborhood_kl" in mb:
            assert ma["neighborhood_kl"]["per_prompt"] == pytest.approx(mb["neighborhood_kl"]["per_prompt"], abs=1e-5)
        if not b["edit"].get("refused"):
            assert a["edit"].get("rerun_from_block") == b["edit"].get("rerun_from_block")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "opt"])
@pytest.mark.parametrize("alg", ["NONE", "SHIFT", "SHIFT-no-kl", "SHIFT-block0", "SHIFT-refused"])
def test_packed_unedited_passes_give_the_per_record_numbers(model_type, alg, byte_tok, tmp_path, monkeypatch):
    from shift_edit.bench import BenchConfig, load_counterfact
    from shift_edit.bench.prepare import Prepared

    resumed = []  # records measured unedited from the recorded block (the refused edits)
    real = Prepared.resume_unedited
    monkeypatch.setattr(Prepared, "resume_unedited", lambda self: resumed.append(self.case.case_id) or real(self))

    path = tmp_path / "cf.json"
    path.write_text(__import__("json").dumps(_records()))
    cases = load_counterfact(path)
    model = tiny_model(model_type)
    layer = 0 if alg == "SHIFT-block0" else 2
    hp = None if alg == "NONE" else se.ShiftHyperParams(  # refused: measured unedited, from the recorded block
        layers=[layer], eta=50.0, eta_scaling="normalized", skip_if_predicted=False,
        max_relative_norm=1e-12 if alg == "SHIFT-refused" else None)
    out = {}
    for k in (1, 16):
        cfg = BenchConfig(alg=alg.split("-")[0], hparams=hp, skip_generation=True, skip_wild=True, score_records=k,
                          batch_size=4, neighborhood_kl=alg != "SHIFT-no-kl")
        out[k] = _run_cases(model, byte_tok, cases, cfg)
    _assert_same_numbers(out[16], out[1])
    assert all(bool(r["edit"].get("refused")) == (alg == "SHIFT-refused") for r in out[16] + out[1])
    assert resumed == ([c.case_id for c in cases] if alg == "SHIFT-refused" and layer else [])
    if alg.startswith("SHIFT") and alg != "SHIFT-refused":
        assert {r["edit"]["rerun_from_block"] for r in out[16]} == {layer}
        if alg not in ("SHIFT-no-kl", "SHIFT-refused"):
            assert any(r["metrics"]["neighborhood_kl"]["mean"] > 0 for r in out[16])  # the edits changed something


def test_packed_batches_mix_records_and_return_each_its_own(byte_tok):
    from shift_edit.bench.packing import PartPasses, packed_logits, recorder_for

    model = tiny_model("llama")
    adapter = se.ModelAdapter(model)
    parts = [PartPasses([byte_tok.encode("ab cd"), byte_tok.encode("x")], [[3, 4], [0]]),
             PartPasses([], []),
             PartPasses([byte_tok.encode("a longer one here")], [[2, 16]])]
    got = packed_logits(model, parts, pad_id=0, batch_size=2, adapter=adapter, block=1)
    for part, logits, hidden in zip(parts, got.logits, got.hidden):
        assert len(logits) == len(hidden) == len(part.seqs)
        for seq, pos, lg, h in zip(part.seqs, part.positions, logits, hidden):
            alone = logits_at_positions(model, [seq], [pos], batch_size=1)[0]
            assert torch.allclose(lg, alone, atol=1e-5) and h.shape[0] == len(seq)
    seqs = parts[0].seqs  # rows re-batched as the part's own pass batches them, zeros where padded
    rec = recorder_for(adapter, 1, seqs, got.hidden[0], batch_size=2)
    assert len(rec) == 1 and rec.passes[0][1].shape[:2] == (2, 5) and not rec.passes[0][1][1, 1:].any()
    with pytest.raises(ValueError, match="needs a block"):
        packed_logits(model, parts, pad_id=0, batch_size=2, stop=True)


def test_run_bench_windows_of_records_equal_each_record_alone(byte_tok, tmp_path):
    import json
    from pathlib import Path

    from shift_edit.bench import BenchConfig, file_sha256, load_counterfact, run_bench

    path = tmp_path / "cf.json"
    path.write_text(json.dumps(_records()))
    cases = load_counterfact(path)
    model = tiny_model("llama")
    hp = se.ShiftHyperParams(layers=[1], eta=50.0, eta_scaling="normalized", skip_if_predicted=False)
    runs = {}
    for k in (1, 4):  # 4: two windows of records (4 + 2)
        cfg = BenchConfig(alg="SHIFT", hparams=hp, skip_generation=True, skip_wild=True, score_records=k)
        run = run_bench(model, byte_tok, cases, cfg, tmp_path / f"out{k}", model_name="tiny",
                        data_info={"path": str(path), "sha256": file_sha256(path)}, progress=False)
        runs[k] = [json.loads(p.read_text()) for p in sorted(Path(run).glob("case_*.json"))]
        assert len(runs[k]) == len(cases)
        assert all(r["time_s"]["prepare"] > 0 for r in runs[k])
    _assert_same_numbers(runs[4], runs[1])


def test_packed_windows_are_fixed_by_position_so_shards_and_resumes_give_the_same_bits(byte_tok, tmp_path):
    """A window's records are packed together whoever runs them: two hand-set shards (the window of 4 spans both)
    and a resumed run (some records already done) write exactly the whole run's metrics."""
    import json
    from pathlib import Path

    from shift_edit.bench import BenchConfig, file_sha256, load_counterfact, run_bench

    path = tmp_path / "cf.json"
    path.write_text(json.dumps(_records()))
    cases = load_counterfact(path)
    model = tiny_model("gpt2")
    cfg = BenchConfig(alg="SHIFT", skip_generation=True, skip_wild=True, score_records=4, batch_size=3,
                      hparams=se.ShiftHyperParams(layers=[1], eta=50.0, eta_scaling="normalized",
                                                  skip_if_predicted=False))

    def run(out, **kw):
        d = run_bench(model, byte_tok, cases, cfg, out, model_name="tiny", progress=False,
                      data_info={"path": str(path), "sha256": file_sha256(path)}, **kw)
        return d, {p.name: json.loads(p.read_text())["metrics"] for p in sorted(Path(d).glob("case_*.json"))}

    whole_dir, whole = run(tmp_path / "whole")
    assert len(whole) == len(cases)
    for rank in (0, 1):
        sharded_dir, sharded = run(tmp_path / "sharded", rank=rank, world_size=2)
    assert sharded == whole
    for name in ("case_1.json", "case_2.json", "case_4.json"):
        (Path(whole_dir) / name).unlink()
    assert run(tmp_path / "whole")[1] == whole
