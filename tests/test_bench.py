"""The CounterFact harness: hand-checkable metrics, batching, resume, sharding, data errors, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.bench import counterfact as bdata
from shift_edit.bench import generation as bg
from shift_edit.bench import metrics as bm
from shift_edit.bench import wikitext as bp
from shift_edit.bench.bench_config import BenchConfig
from shift_edit.bench.runner import run_bench
from shift_edit.bench.summarize import METRICS, harmonic_mean, load_reference, summarize_run, to_csv, to_markdown
from shift_edit.model.scoring import ContinuationScore

REPO = Path(__file__).resolve().parents[1]


def rome_record(case_id=7, subject="Messi", new="Paris", true="Rome"):
    return {
        "case_id": case_id,
        "requested_rewrite": {"prompt": "{} plays for", "subject": subject, "relation_id": "P54",
                              "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}},
        "paraphrase_prompts": [f"Yes. {subject} plays for", f"Indeed {subject} is a player of"],
        "neighborhood_prompts": ["Totti plays for", "Baggio played for", "Pirlo is with"],
        "attribute_prompts": ["Zidane plays for"],
        "generation_prompts": [f"{subject} is", f"The team of {subject}"],
    }


def easyedit_record(case_id=3):
    return {"case_id": case_id, "prompt": "Messi plays for", "target_new": "Paris", "subject": "Messi",
            "ground_truth": "Rome", "rephrase_prompt": "Messi likes", "locality_prompt": "Totti plays for",
            "locality_ground_truth": "Rome"}


def cs(nll, correct):
    """A hand-made ContinuationScore."""
    return ContinuationScore(list(range(len(nll))), torch.tensor(nll), torch.tensor(correct),
                             torch.zeros(len(nll), dtype=torch.long))


# ----------------------------------------------------------------------------- metrics by hand

def test_rome_and_top1_differ_on_multitoken_targets():
    # rewrite: new = 2 tokens, both argmax but mean NLL 1.55 > true's 1.0 -> ROME fails, top-1 succeeds
    # paraphrase 1: new NLL 0.5 < true 2.0 but 2nd token not argmax -> ROME ok, top-1 fails, first-token ok
    # paraphrase 2: new 3.0 > true 0.2, nothing correct
    # neighborhood: true NLL 0.3 < new 1.0, true all argmax -> NS 1, top1 1; second prompt true 2-token half right
    scores = {
        "rewrite": [(cs([0.1, 3.0], [True, True]), cs([1.0], [False]))],
        "paraphrase": [(cs([0.4, 0.6], [True, False]), cs([2.0], [False])),
                       (cs([3.0], [False]), cs([0.2], [True]))],
        "neighborhood": [(cs([1.0], [False]), cs([0.3], [True])),
                         (cs([0.5], [True]), cs([0.1, 2.0], [True, False]))],
    }
    m = bm.metrics_from_scores(scores)
    assert m["rome"]["rewrite_success"] == 0.0
    assert m["top1"]["rewrite_acc"] == 1.0
    assert m["rome"]["rewrite_magnitude"] == pytest.approx(math.exp(-1.55) - math.exp(-1.0), abs=1e-6)
    assert m["rome"]["paraphrase_success"] == 0.5
    assert m["top1"]["paraphrase_acc"] == 0.0
    assert m["top1_first"]["paraphrase_acc"] == 0.5
    pm = ((math.exp(-0.5) - math.exp(-2.0)) + (math.exp(-3.0) - math.exp(-0.2))) / 2
    assert m["rome"]["paraphrase_magnitude"] == pytest.approx(pm, abs=1e-6)
    # neighborhood: prompt 2 has NLL(true)=1.05 > NLL(new)=0.5 -> fails NS
    assert m["rome"]["neighborhood_success"] == 0.5
    assert m["top1"]["neighborhood_acc"] == 0.5  # judged on the TRUE object
    assert m["top1_first"]["neighborhood_acc"] == 1.0
    nm = ((math.exp(-0.3) - math.exp(-1.0)) + (math.exp(-1.05) - math.exp(-0.5))) / 2
    assert m["rome"]["neighborhood_magnitude"] == pytest.approx(nm, abs=1e-6)
    assert m["nll"]["rewrite"][0] == {"target_new": pytest.approx(1.55), "target_true": pytest.approx(1.0)}


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert bg.text_ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert bg.text_ngram_entropy("x x x x x") == 0.0  # one repeated bigram and trigram
    assert bg.ngram_entropy(["a b a b", "x x x x x"]) == pytest.approx((2 / 3 * h2 + 4 / 3) / 4)
    assert bg.word_tokens("Paris, France's capital.") == ["Paris", ",", "France", "'s", "capital", "."]
    # word_tokenize's word tokenizer (not Treebank's): curly quotes and ellipses are split off
    assert bg.word_tokens("\u201chello\u201d\u2026 it\u2019s") == [
        "\u201c",
        "hello",
        "\u201d",
        "\u2026",
        "it",
        "\u2019",
        "s",
    ]
    from nltk.tokenize import word_tokenize

    text = "The city of Paris is large. It has \u201cmany\u201d museums, e.g. the Louvre..."
    assert bg.word_tokens(text) == word_tokenize(text, preserve_line=True)


def test_kl_by_hand():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(bm.kl_divergence(p, q)[0]) == pytest.approx(expected, abs=1e-6)
    assert float(bm.kl_divergence(p, p)[0]) == 0.0


def _manual_line_nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_perplexity_protocols_by_hand(byte_tok):
    model = tiny_model("gpt2")
    lines = ["short", " = Heading = with enough characters here", " another line that is long enough to count",
             " third line of text long enough for the protocol"]
    proto = bp.PerplexityProtocol(name="paper", n_lines=2, min_chars=30, max_tokens=20)
    chosen = lines[1:3]
    per_line = [math.exp(float(_manual_line_nll(model, byte_tok(ln).input_ids[:20]).mean())) for ln in chosen]
    assert bp.perplexity(model, byte_tok, lines, proto, batch_size=2) == pytest.approx(sum(per_line) / 2, rel=1e-5)
    ids = byte_tok("\n".join(lines[:2])).input_ids
    full = math.exp(float(_manual_line_nll(model, ids).mean()))
    big = bp.PerplexityProtocol(name="standard", window=100, stride=100)
    assert bp.perplexity(model, byte_tok, lines[:2], big) == pytest.approx(full, rel=1e-5)
    # small windows: every token after the first is counted exactly once, predicted from the start
    # of the window it is new in (window 16, stride 8: position 0 for j < 16, else 8 * (j // 8 - 1))
    small = bp.PerplexityProtocol(name="standard", window=16, stride=8)
    assert len(ids) > 40  # several windows
    nlls = [
        float(_manual_line_nll(model, ids[(0 if j < 16 else 8 * (j // 8 - 1)) : j + 1])[-1]) for j in range(1, len(ids))
    ]
    assert bp.perplexity(model, byte_tok, lines[:2], small) == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_generation_is_seeded_and_left_padded(byte_tok):
    model = tiny_model("llama")
    prompts = ["ab", "a longer prompt"]
    a = bg.generate_topk(model, byte_tok, prompts, max_length=24, top_k=5, seed=3)
    b = bg.generate_topk(model, byte_tok, prompts, max_length=24, top_k=5, seed=3)
    assert a == b and a[0].startswith("ab") and a[1].startswith("a longer prompt")
    # top-k = 1 is greedy: the batched, left-padded row equals the unpadded single run
    g_batch = bg.generate_topk(model, byte_tok, prompts, max_length=24, top_k=1)
    g_one = bg.generate_topk(model, byte_tok, prompts[:1], max_length=24 - (len(prompts[1]) - len(prompts[0])), top_k=1)
    assert g_batch[0] == g_one[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_equals_hf_generate(byte_tok, arch):
    """Our KV-cached decoding loop (top-k = 1) gives what transformers' own generate gives."""
    model = tiny_model(arch)
    ids = byte_tok("hello wor", return_tensors="pt").input_ids
    n = 30 - ids.shape[1]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
    assert bg.generate_topk(model, byte_tok, ["hello wor"], max_length=30, top_k=1)[0] == \
        byte_tok.decode(ref[0], skip_special_tokens=True)


def test_grouped_generation_equals_each_record_on_its_edited_model(byte_tok):
    """Several records in one decoding batch, each with its own edit added to its rows, give
    each record the texts of its own edited model (greedy), and a record's sampled texts do not
    depend on the records beside it."""
    from shift_edit.studies.common import temporarily_applied

    model = tiny_model("llama")
    hp = se.ShiftHyperParams(layers=[1], eta=40.0, skip_if_predicted=False)
    reqs = [{"prompt": "ab plays", "target_new": "Paris"}, {"prompt": "a longer prompt", "target_new": "Rome"}]
    deltas = [se.get_algorithm("SHIFT").compute(model, byte_tok, [se.make_request(r)], hp).deltas for r in reqs]
    groups = [bg.GenerationGroup(["ab", "xyz q"], 1), bg.GenerationGroup(["ab plays"], 2, deltas[0]),
              bg.GenerationGroup(["abc", "de"], 3, deltas[1])]
    greedy = bg.generate_topk_groups(model, byte_tok, groups, max_length=24, top_k=1)
    for g, texts in zip(groups, greedy):
        with temporarily_applied(model, g.deltas):
            alone = bg.generate_topk_groups(model, byte_tok, [bg.GenerationGroup(g.prompts, g.seed)], max_length=24,
                                            top_k=1)[0]
        assert texts == alone
    assert greedy[1] != bg.generate_topk(model, byte_tok, ["ab plays"], max_length=24, top_k=1)  # the edit shows
    sampled = bg.generate_topk_groups(model, byte_tok, groups, max_length=24, top_k=5)
    again = bg.generate_topk_groups(model, byte_tok, groups[::-1], max_length=24, top_k=5)[::-1]
    assert sampled == again  # each group draws from its own seeded generator


# ----------------------------------------------------------------------------- data

def write(tmp_path, obj, name="cf.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def test_load_both_formats_and_selection(tmp_path):
    recs = [rome_record(i, subject=f"S{i}") for i in range(5)]
    p = write(tmp_path, recs)
    cases = bdata.load_counterfact(p)
    assert [c.case_id for c in cases] == [0, 1, 2, 3, 4]
    assert cases[0].request.target_new == " Paris" and cases[0].neighborhood_true == " Rome"
    assert len(cases[0].paraphrase_prompts) == 2 and cases[0].rephrase_prompts == ()
    assert [c.case_id for c in bdata.load_counterfact(p, start=1, limit=2)] == [1, 2]
    assert [c.case_id for c in bdata.load_counterfact(p, case_ids=bdata.parse_case_ids("4,0-1"))] == [0, 1, 4]
    e = bdata.load_counterfact(write(tmp_path, [easyedit_record()], "ee.json"))[0]
    assert e.source_format == "easyedit" and e.paraphrase_prompts == ()
    assert e.rephrase_prompts == ("Messi likes",) and e.neighborhood_prompts == ("Totti plays for",)
    assert set(bm.case_prompts(e)) == {"rewrite", "rephrase", "neighborhood"}


@pytest.mark.parametrize("content, match", [
    ('[{"case_id": 1, "requested_rewrite": {', "not valid JSON"),
    ({"x": 1}, "expected a JSON list"),
    ([None], "record #0"),
])
def test_malformed_files(tmp_path, content, match):
    with pytest.raises(se.ShiftEditError, match=match):
        bdata.load_counterfact(write(tmp_path, content))


def test_bad_record_is_named(tmp_path):
    bad = rome_record(9)
    del bad["requested_rewrite"]["target_true"]
    with pytest.raises(se.ShiftEditError, match=r"record #1 \(case_id 9\).*target_true"):
        bdata.load_counterfact(write(tmp_path, [rome_record(1), bad]))
    bad2 = rome_record(11)
    bad2["neighborhood_prompts"] = [3]
    with pytest.raises(se.ShiftEditError, match=r"case_id 11.*neighborhood_prompts"):
        bdata.load_counterfact(write(tmp_path, [bad2]))
    with pytest.raises(se.ShiftEditError, match="case ids not in"):
        bdata.load_counterfact(write(tmp_path, [rome_record(1)]), case_ids=["5"])


def test_truncated_file_names_the_broken_record(tmp_path):
    text = json.dumps([rome_record(1), rome_record(2), rome_record(3)], indent=2)
    cut = text[: text.index('"case_id": 3') + 40]  # a download cut off inside the third record
    with pytest.raises(se.ShiftEditError, match=r"record #2 \(the one after case_id 2\) is truncated"):
        bdata.load_counterfact(write(tmp_path, cut))
    cut = text[: text.rindex("}") + 1]  # every record complete, the closing bracket missing
    with pytest.raises(se.ShiftEditError, match=r"after record #2 \(case_id 3\) the list is cut off"):
        bdata.load_counterfact(write(tmp_path, cut, "b.json"))


def test_download_checks_sha256_and_caches(tmp_path):
    import hashlib

    src = write(tmp_path, [rome_record(1)], "official.json")
    digest, size = hashlib.sha256(src.read_bytes()).hexdigest(), src.stat().st_size
    cache = tmp_path / "cache"
    got = bdata.download_counterfact(cache, url=src.as_uri(), sha256=digest, size=size)
    assert got.read_bytes() == src.read_bytes() and bdata.load_counterfact(got)[0].case_id == 1
    src.write_text("changed")  # a cached file with the right checksum is reused, not fetched again
    assert bdata.download_counterfact(cache, url=src.as_uri(), sha256=digest, size=size) == got
    with pytest.raises(se.ShiftEditError, match="has sha256"):
        bdata.download_counterfact(tmp_path / "c2", url=src.as_uri(), sha256=digest, size=size)
    assert list((tmp_path / "c2").iterdir()) == []  # the bad download is removed


def test_hub_dataset_is_loaded_once_into_a_local_file(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [rome_record(5), rome_record(6)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(tmp_path))
    p = bdata.resolve_data("hf:")
    assert calls == [("azhx/counterfact", "train")]
    assert [c.case_id for c in bdata.load_counterfact(p)] == [5, 6]
    assert bdata.resolve_data("hf:") == p and len(calls) == 1  # cached
    bdata.resolve_data("hf:someone/cf:test")
    assert calls[-1] == ("someone/cf", "test")

    def failing(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(se.ShiftEditError, match="could not load hub dataset 'x/y'.*no network"):
        bdata.resolve_data("hf:x/y")
    with pytest.raises(se.ShiftEditError, match="duplicate case_id"):
        bdata.load_counterfact(write(tmp_path, [rome_record(1), rome_record(1)]))


# ----------------------------------------------------------------------------- batching

def test_batched_scoring_equals_unbatched(byte_tok, tmp_path):
    model = tiny_model("llama")
    case = bdata.load_counterfact(write(tmp_path, [rome_record()]))[0]
    a = bm.score_case(model, byte_tok, case, batch_size=64)
    b = bm.score_case(model, byte_tok, case, batch_size=1)
    for g in a:
        for (n1, t1), (n2, t2) in zip(a[g], b[g]):
            assert torch.allclose(n1.token_nll, n2.token_nll, atol=1e-5)
            assert torch.allclose(t1.token_nll, t2.token_nll, atol=1e-5)
            assert torch.equal(n1.token_correct, n2.token_correct) and torch.equal(t1.token_correct, t2.token_correct)
    # ... and equals scoring each (prompt, target) pair alone, with no shared prefixes
    for g, rows in a.items():
        prompts = {"rewrite": case.rewrite_prompts, "paraphrase": case.paraphrase_prompts,
                   "neighborhood": case.neighborhood_prompts}[g]
        true = case.neighborhood_true if g == "neighborhood" else case.request.target_true
        for p, (n1, t1) in zip(prompts, rows):
            n2, t2 = se.model.scoring.score_continuations(model, byte_tok, [p, p], [case.request.target_new, true],
                                                          batch_size=1)
            assert torch.allclose(n1.token_nll, n2.token_nll, atol=1e-5) and torch.allclose(
                t1.token_nll, t2.token_nll, atol=1e-5
            )
    # next-token distributions for KL too
    nb = case.neighborhood_prompts
    assert torch.allclose(bm.next_token_logprobs(model, byte_tok, nb, batch_size=8),
                          bm.next_token_logprobs(model, byte_tok, nb, batch_size=1), atol=1e-5)


# ----------------------------------------------------------------------------- runner

HP = dict(layers=[1], eta=2.0, skip_if_predicted=False)


def _cfg(**kw):
    """No generation of either family: each record its own group (resume and sharding by record)."""
    return BenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), skip_generation=True, skip_wild=True, **kw)


def _run(model, tok, path, out, **kw):
    return run_bench(model, tok, bdata.load_counterfact(path, **kw.pop("sel", {})), kw.pop("cfg", _cfg()), out,
                     data_info={"path": str(path), "sha256": bdata.file_sha256(path)}, model_name="tiny-llama",
                     progress=False, **kw)


def _metrics(run_dir):
    return {p.name: json.loads(p.read_text())["metrics"] for p in sorted(Path(run_dir).glob("case_*.json"))}


def test_gen_every_generates_for_every_kth_record_only(byte_tok, tmp_path):
    model = tiny_model("llama")
    path = write(tmp_path, [rome_record(i, subject=f"S{i}") for i in range(5)])
    kw = dict(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), gen_max_length=20, neighborhood_kl=False, gen_records=2)
    every = _metrics(_run(model, byte_tok, path, tmp_path / "all", cfg=BenchConfig(**kw)))
    some_dir = _run(model, byte_tok, path, tmp_path / "some", cfg=BenchConfig(**kw, gen_every=2))
    some = _metrics(some_dir)
    with_gen = sorted(k for k, m in some.items() if "generation" in m)
    assert with_gen == ["case_0.json", "case_2.json", "case_4.json"]
    for k in with_gen:  # the same texts as generating for every record (per-record seeds and edits)
        assert some[k]["generation"] == every[k]["generation"]
    assert (
        json.loads((some_dir / "params.json").read_text())["match"]["protocol"]["generation"]["every_kth_record"] == 2
    )
    assert summarize_run(some_dir)["metrics"]["ngram_entropy"]["n"] == 3
    rec = json.loads((some_dir / "case_1.json").read_text())
    assert isinstance(rec["edit"]["info"], dict)  # the algorithm's per-request details travel with the record


def test_run_resume_undo_and_leftover_tmp(byte_tok, tmp_path, monkeypatch):
    model = tiny_model("llama")
    fp = se.files.io.model_fingerprint(model)
    data = write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(4)])
    run = _run(model, byte_tok, data, tmp_path / "res", sel={"limit": 2}, rank=0, world_size=1)
    assert run == tmp_path / "res" / "SHIFT" / "run_000"
    assert se.files.io.model_fingerprint(model) == fp  # every edit undone
    params = json.loads((run / "params.json").read_text())
    assert params["match"]["protocol"]["metric_families"]["top1"].startswith("strict top-1")
    assert params["match"]["model"]["fingerprint"] == fp and params["provenance"]["versions"]["torch"]
    first = {p.name: p.stat().st_mtime_ns for p in run.glob("case_*.json")}
    assert sorted(first) == ["case_0.json", "case_1.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "case_0.json").stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, not mkstemp's 0600
    (run / ".case_2.json.abc.tmp").write_text('{"trunc')  # what a kill mid-write leaves
    import shift_edit.bench.runner as R

    calls = []
    real = R.evaluate_batch
    monkeypatch.setattr(R, "evaluate_batch", lambda *a, **k: calls.extend(c.case_id for c in a[2]) or real(*a, **k))
    assert _run(model, byte_tok, data, tmp_path / "res", sel={"limit": 4}, rank=0, world_size=1) == run
    assert calls == [2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("case_*.json") if p.name in first} == first
    # a different configuration (seed) gets its own run dir
    assert _run(model, byte_tok, data, tmp_path / "res", sel={"limit": 1}, cfg=_cfg(seed=1), rank=0,
                world_size=1).name == "run_001"
    times = sorted(json.loads(p.read_text())["time_s"]["edit"] for p in run.glob("case_*.json"))
    assert len(times) == 4 and summarize_run(run)["metrics"]["edit_time_median_s"]["mean"] == pytest.approx(
        (times[1] + times[2]) / 2
    )
    m = _metrics(run)["case_0.json"]
    assert set(m) >= {"rome", "top1", "top1_first", "nll", "neighborhood_kl"}
    assert m["neighborhood_kl"]["mean"] >= 0


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_rerunning_edited_blocks_equals_full_passes(model_type, byte_tok, tmp_path):
    from shift_edit.bench.runner import RunState, evaluate_case

    model = tiny_model(model_type)
    cases = bdata.load_counterfact(write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(3)]))
    cfg = BenchConfig(
        alg="SHIFT",
        hparams=se.ShiftHyperParams(
            layers=[2], eta=50.0, eta_scaling="normalized", skip_if_predicted=False, max_relative_norm=None
        ),
        skip_generation=True,
    )
    fast_state, slow_state = RunState(), RunState(resume_exact=False)
    for i, case in enumerate(cases):
        fast = evaluate_case(model, byte_tok, case, cfg, position=i, ppl_lines=None, state=fast_state)
        slow = evaluate_case(model, byte_tok, case, cfg, position=i, ppl_lines=None, state=slow_state)
        assert fast["edit"]["rerun_from_block"] == 2 and slow["edit"]["rerun_from_block"] == 0
        for fam in ("rome", "top1", "top1_first"):
            assert fast["metrics"][fam] == pytest.approx(slow["metrics"][fam], abs=1e-6)
        assert fast["metrics"]["neighborhood_kl"]["mean"] == pytest.approx(
            slow["metrics"]["neighborhood_kl"]["mean"], abs=1e-6
        )
        assert fast["metrics"]["neighborhood_kl"]["mean"] > 0
    assert fast_state.resume_exact is True


def test_unedited_row_and_summary(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    data = write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(3)])
    cfg = BenchConfig(alg="NONE", hparams=None, seed=0, gen_max_length=20)
    run = _run(model, byte_tok, data, tmp_path / "res", cfg=cfg, rank=0, world_size=1)
    m = _metrics(run)
    assert all(v["neighborhood_kl"]["mean"] == 0.0 for v in m.values())
    assert all(v["generation"]["ngram_entropy"] > 0 for v in m.values())
    s = summarize_run(run)
    assert s["label"] == "measured here (NONE, tiny-llama, N=3)"
    es = [v["rome"]["rewrite_success"] * 100 for v in m.values()]
    assert s["metrics"]["ES"]["mean"] == pytest.approx(sum(es) / 3)
    ref = load_reference(REPO / "eval" / "reference" / "backward_lens_table6.json")
    assert ref[0]["label"].startswith("published (")
    md = to_markdown([s, *ref])
    assert "measured here (NONE" in md and "published (NONE (unedited), GPT-2 XL, N=1000" in md
    assert "efficacy_top1" in to_csv([s])
    assert harmonic_mean([50.0, 100.0, 100.0]) == pytest.approx(75.0)
    # record selection: the first N in run order, or given case ids (what --limit / --common use)
    assert summarize_run(run, limit=2)["case_ids"] == [0, 1]
    two = summarize_run(run, case_ids={"0", "2"})
    assert two["n"] == 2 and two["metrics"]["ES"]["mean"] == pytest.approx((es[0] + es[2]) / 2)
    with pytest.raises(se.ShiftEditError, match="no finished cases in the selection"):
        summarize_run(run, case_ids={"99"})
    # the summary row carries the run's protocol: metric families, model fingerprint, seed, versions
    assert s["protocol"]["protocol"]["metric_families"]["top1"].startswith("strict top-1")
    assert s["protocol"]["model"]["fingerprint"] and s["provenance"]["versions"]["torch"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "eval" / "reference").glob("*.json")))
def test_published_references_are_labelled_and_consistent(name):
    """Every published table loads as 'published (...)' rows with its metric family, and where a
    row has ROME's S it is the harmonic mean of its ES, PS and NS (a transcription check)."""
    path = REPO / "eval" / "reference" / name
    raw = json.loads(path.read_text())
    assert raw["metric_family"] and raw["source"] and (raw["n"] is None or raw["n"] > 0)  # None: the source states none
    rows = load_reference(path)
    if raw.get("dataset"):  # zsRE / KnowEdit tables: every column one summarize shows in that data set's table
        assert all(r["dataset"] == raw["dataset"] for r in rows)
        assert all(k in {m[0] for m in METRICS} for r in rows for k in r["metrics"])
    assert rows and all(r["label"].startswith("published (") and r["kind"] == "published" for r in rows)
    # every row names its source, model and setting (T and B, or single edits / one batch) in its label
    assert raw["setting"] and raw["verification"] and ("T=" in raw["setting"] or raw.get("sequential"))
    for r, row in zip(rows, raw["rows"]):
        setting = f"T={raw['sequential']['T']}, B={raw['sequential']['B']}" if raw.get("sequential") else raw["setting"]
        assert r["model"] == row.get("model", raw["model"]) and r["model"] in r["label"]
        assert setting in r["label"] and raw["source"] in r["label"] and r["dataset"] == raw.get("dataset",
                                                                                                 "counterfact")
    family = {"zsre": "zsre_token_acc"}.get(raw.get("dataset", ""), "easyedit" if "knowedit" in name else None)
    assert family is None or raw["metric_family"].startswith(family)
    for r in rows:
        m = {k: v["mean"] for k, v in r["metrics"].items()}
        if {"S", "ES", "PS", "NS"} <= m.keys():
            assert harmonic_mean([m["ES"], m["PS"], m["NS"]]) == pytest.approx(m["S"], abs=0.1), r["alg"]


def test_published_zsre_and_knowedit_numbers():
    """Transcription checks of the zsRE / KnowEdit tables: the rows AlphaEdit's paper prints twice (Tables 1 and
    2) are equal, the numbers issue 32 quotes are there, and each KnowEdit file is one column of the same table."""
    ref = REPO / "eval" / "reference"
    def table(name):
        return {(r["alg"], r["model"]): {k: v["mean"] for k, v in r["metrics"].items()}
                for r in load_reference(ref / name)}
    t1, t2 = table("alphaedit_table1_zsre_sequential.json"), table("alphaedit_table2_zsre_sequential.json")
    shared = set(t1) & set(t2)
    assert {a for a, _ in shared} == {"AlphaEdit", "NONE (unedited)"} and len(shared) == 6
    assert all(t1[k] == t2[k] for k in shared)
    assert {m for _, m in t1} == {"Llama3-8B", "GPT-J", "GPT2-XL"} and len(t1) == 27
    cols = ("zsre_efficacy", "zsre_generalization", "zsre_specificity")
    quoted = {("AlphaEdit", "Llama3-8B"): (94.47, 91.13, 32.55), ("AlphaEdit", "GPT-J"): (99.79, 96.00, 28.29),
              ("MEMIT", "Llama3-8B"): (34.62, 31.28, 18.49)}
    assert all(tuple(t1[k][c] for c in cols) == v for k, v in quoted.items())
    rome = table("rome_table1_zsre_gpt2xl.json")
    assert tuple(rome[("ROME", "GPT-2 XL")][c] for c in cols) == (99.8, 88.1, 24.2)
    algs = None
    for name in ("zsre", "recent", "counterfact", "wikibio"):
        rows = load_reference(ref / f"knowedit_{name}_llama2_7b_chat.json")
        assert algs is None or [r["alg"] for r in rows] == algs
        algs = [r["alg"] for r in rows]
        assert all(r["model"] == "Llama-2-7b-chat" and r["label"].count("single edits (T=1, B=1") == 1 for r in rows)
        assert all(0 <= v["mean"] <= 100 for r in rows for k, v in r["metrics"].items() if k != "ee_fluency")
    assert "GRACE" not in algs and {"ROME", "MEMIT", "FT-L", "AdaLoRA", "SERAC", "ICE"} <= set(algs)


def _save_tiny(tmp_path, tok):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _cli(args, env=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "shift_edit", *args], capture_output=True, text=True, env=e, cwd=REPO)


def test_sharded_two_processes_equal_unsharded(byte_tok, tmp_path):
    folder = _save_tiny(tmp_path, byte_tok)
    data = write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(4)])
    hp = tmp_path / "hp.yaml"
    hp.write_text("alg_name: SHIFT\nlayers: [1]\neta: 2.0\nskip_if_predicted: false\n")
    args = ["bench", "--alg", "SHIFT", "--model", str(folder), "--hparams", str(hp), "--data", str(data),
            "--skip-generation", "--no-progress"]
    procs = [subprocess.Popen([sys.executable, "-m", "shift_edit", *args, "--out", str(tmp_path / "sharded")],
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(r),
                                   "WORLD_SIZE": "2"},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    model, tok = se.load_model(str(folder))
    plain = _run(model, tok, data, tmp_path / "plain", rank=0, world_size=1)
    sharded = tmp_path / "sharded" / "SHIFT" / "run_000"
    assert not (tmp_path / "sharded" / "SHIFT" / "run_001").exists()
    a, b = _metrics(sharded), _metrics(plain)
    assert sorted(a) == [f"case_{i}.json" for i in range(4)] == sorted(b)
    for k in a:
        for fam in ("rome", "top1", "top1_first"):
            assert a[k][fam] == pytest.approx(b[k][fam], abs=1e-6)
        for g in a[k]["nll"]:
            for x, y in zip(a[k]["nll"][g], b[k]["nll"][g]):
                assert x == pytest.approx(y, abs=1e-5)
    from shift_edit.cli import main

    # `--procs 2` launches the same two shards itself
    assert main([*args, "--out", str(tmp_path / "procs"), "--procs", "2"]) == 0
    c = _metrics(tmp_path / "procs" / "SHIFT" / "run_000")
    assert sorted(c) == sorted(a)
    for k in c:
        assert c[k]["top1"] == pytest.approx(a[k]["top1"], abs=1e-6)
    assert main(["summarize", str(sharded), str(plain), "--out", str(tmp_path / "sum")]) == 0
    assert (tmp_path / "sum" / "summary.png").stat().st_size > 0 and (tmp_path / "sum" / "summary.csv").is_file()


def test_torchrun_shards_into_one_run_dir(byte_tok, tmp_path):
    """``torchrun`` (what ``accelerate launch --multi_gpu`` runs underneath) sets RANK/WORLD_SIZE:
    two processes share one run dir and give the unsharded case files."""
    folder = _save_tiny(tmp_path, byte_tok)
    data = write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(4)])
    hp = tmp_path / "hp.yaml"
    hp.write_text("alg_name: SHIFT\nlayers: [1]\neta: 2.0\nskip_if_predicted: false\n")
    args = ["bench", "--alg", "SHIFT", "--model", str(folder), "--hparams", str(hp), "--data", str(data),
            "--skip-generation", "--no-progress", "--out", str(tmp_path / "tr")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "shift_edit", "-v", *args], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(rank 0/2)" in r.stderr and "(rank 1/2)" in r.stderr
    model, tok = se.load_model(str(folder))
    plain = _metrics(_run(model, tok, data, tmp_path / "plain", rank=0, world_size=1))
    sharded = _metrics(tmp_path / "tr" / "SHIFT" / "run_000")
    assert sorted(sharded) == sorted(plain) == [f"case_{i}.json" for i in range(4)]
    for k in plain:
        assert sharded[k]["top1"] == plain[k]["top1"] and sharded[k]["rome"] == pytest.approx(
            plain[k]["rome"], abs=1e-6
        )


def test_killed_run_resumes_to_the_same_case_files(byte_tok, tmp_path):
    """SIGKILL a real run after its first case file, re-run the same command: the run dir is
    reused, finished cases are kept, no partial file is read, and the result equals a run
    that was never interrupted."""
    import signal
    import time

    folder = _save_tiny(tmp_path, byte_tok)
    data = write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(24)])
    args = ["bench", "--alg", "NONE", "--model", str(folder), "--data", str(data), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed" / "NONE" / "run_000"
    proc = subprocess.Popen([sys.executable, "-m", "shift_edit", *args, "--out", str(tmp_path / "killed")],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(run_dir.glob("case_*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.read_bytes() for p in run_dir.glob("case_*.json")}
    assert 0 < len(done_before) < 24, "the kill landed mid-run"
    assert _cli([*args, "--out", str(tmp_path / "killed")], env={"OMP_NUM_THREADS": "1"}).returncode == 0
    after = {p.name: p.read_bytes() for p in run_dir.glob("case_*.json")}
    assert len(after) == 24 and all(after[k] == v for k, v in done_before.items())  # kept as they were
    assert not (tmp_path / "killed" / "NONE" / "run_001").exists()
    assert _cli([*args, "--out", str(tmp_path / "whole")]).returncode == 0
    whole = _metrics(tmp_path / "whole" / "NONE" / "run_000")
    resumed = _metrics(run_dir)
    assert whole.keys() == resumed.keys()
    assert resumed == whole  # every metric, generations included (seeded per record)


@pytest.mark.parametrize("extra, msg", [
    (["--data", "/nonexistent.json"], "does not exist"),
    (["--limit", "0"], "--limit"),
    (["--ppl-every", "-1"], "--ppl-every"),
    (["--case-ids", "999"], "case ids not in"),
])
def test_cli_bad_input_exit_2(tmp_path, extra, msg):
    data = write(tmp_path, [rome_record(1)])
    r = _cli(["bench", "--alg", "NONE", "--model", "/nonexistent-model", "--data", str(data), *extra])
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_smollm2_end_to_end(smollm2, shared_data, tmp_path):
    model, tok = smollm2
    fp = se.files.io.model_fingerprint(model)
    path = shared_data / "counterfact-original-format-subset837.json"
    hp = se.ShiftHyperParams(layers=[24], eta=80.0, eta_scaling="normalized")
    cfg = BenchConfig(alg="SHIFT", hparams=hp, skip_generation=True)
    run = run_bench(model, tok, bdata.load_counterfact(path, limit=3), cfg, tmp_path,
                    data_info={"path": str(path), "sha256": bdata.file_sha256(path)}, model_name="smollm2-135m",
                    rank=0, world_size=1, progress=False)
    assert se.files.io.model_fingerprint(model) == fp
    cases = [json.loads(p.read_text()) for p in sorted(run.glob("case_*.json"))]
    assert len(cases) == 3
    for c in cases:
        # independent recheck of the rewrite NLLs: the same edit made again with se.edit and the rewrite
        # prompt scored on its own (score_continuations) give the stored values; the stored success
        # flag follows from them
        req = c["request"]
        text = req["prompt"].format(req["subject"])
        res = se.edit(model, tok, req, hp)
        try:
            new, true = se.model.scoring.score_continuations(
                model, tok, [text, text], [req["target_new"], req["target_true"]]
            )
        finally:
            res.undo()
        nll = c["metrics"]["nll"]["rewrite"][0]
        assert nll["target_new"] == pytest.approx(new.mean_nll, rel=1e-3, abs=1e-4)
        assert nll["target_true"] == pytest.approx(true.mean_nll, rel=1e-3, abs=1e-4)
        assert c["metrics"]["rome"]["rewrite_success"] == float(nll["target_new"] < nll["target_true"])
        assert len(c["metrics"]["nll"]["neighborhood"]) == 10 and len(c["metrics"]["nll"]["paraphrase"]) == 2
    assert sum(c["metrics"]["rome"]["rewrite_success"] for c in cases) >= 2
    # WILD-style family (on by default): the stored rewrite continuation is what transformers' own greedy
    # generate says on the edited model (20 new tokens), and the stored success follows from the texts
    from shift_edit.bench.wild import appears_first

    c = cases[0]
    req = c["request"]
    res = se.edit(model, tok, req, hp)
    try:
        ids = tok(req["prompt"].format(req["subject"]), return_tensors="pt").input_ids
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    finally:
        res.undo()
    assert c["metrics"]["wild"]["texts"]["rewrite"] == [tok.decode(ref, skip_special_tokens=True)]
    for c in cases:
        w = c["metrics"]["wild"]
        assert len(w["texts"]["paraphrase"]) == 2 and w["paraphrase_success"] in (0.0, 0.5, 1.0)
        new, true = c["request"]["target_new"], c["request"]["target_true"]
        assert w["rewrite_success"] == float(appears_first(w["texts"]["rewrite"][0], new, true))
    assert se.files.io.model_fingerprint(model) == fp


def test_easyedit_rephrase_and_ppl_every(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    wiki = tmp_path / "wiki.raw"
    wiki.write_text(" = Title = a heading line that is long enough\n\n short\n a second line long enough to count "
                    "here\n")
    data = write(tmp_path, [easyedit_record(i) for i in range(3)])
    proto = bp.PerplexityProtocol(name="paper", n_lines=5, max_tokens=32)
    cfg = BenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), skip_generation=True, ppl_every=2,
                      ppl_protocol=proto, wikitext=str(wiki), neighborhood_kl=False)
    run = _run(model, byte_tok, data, tmp_path / "res", cfg=cfg, rank=0, world_size=1)
    m = _metrics(run)
    assert "rephrase_success" in m["case_0.json"]["rome"] and "paraphrase_success" not in m["case_0.json"]["rome"]
    assert "rephrase_acc" in m["case_0.json"]["top1"] and "neighborhood_kl" not in m["case_0.json"]
    assert (
        json.loads((run / "params.json").read_text())["match"]["protocol"]["metric_families"]["neighborhood_kl"] is None
    )
    assert [("perplexity" in m[f"case_{i}.json"]) for i in range(3)] == [True, False, True]
    s = summarize_run(run)["metrics"]
    assert "RS" in s and "PS" not in s and "S" not in s and s["wikitext_ppl"]["n"] == 2


def test_num_edits_applies_a_batch_then_scores_each_record(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    path = write(tmp_path, [rome_record(i, subject=f"Sub{i}", new=["Paris", "Oslo", "Lima"][i]) for i in range(3)])
    cases = bdata.load_counterfact(path)
    hp = se.ShiftHyperParams(layers=[1], eta=40.0, eta_scaling="normalized", skip_if_predicted=False,
                             max_relative_norm=None)
    cfg = BenchConfig(alg="SHIFT", hparams=hp, skip_generation=True, num_edits=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = _run(model, byte_tok, path, tmp_path / "out", cfg=cfg)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # undone after each batch
    recs = {p.name: json.loads(p.read_text()) for p in sorted(run.glob("case_*.json"))}
    assert recs["case_0.json"]["edit"]["batch"] == [0, 1] == recs["case_1.json"]["edit"]["batch"]
    assert "batch" not in recs["case_2.json"]["edit"]  # the last batch holds one record
    assert json.loads((run / "params.json").read_text())["match"]["protocol"]["num_edits"] == 2
    # record 1 is scored on the model edited with requests 0 and 1 together
    result = se.edit(model, byte_tok, [cases[0].request, cases[1].request], hp)
    try:
        expected = bm.metrics_from_scores(bm.score_case(model, byte_tok, cases[1]))
    finally:
        result.undo()
    for fam in ("rome", "top1"):
        assert recs["case_1.json"]["metrics"][fam] == pytest.approx(expected[fam], abs=1e-6)
    for a, b in zip(recs["case_1.json"]["metrics"]["nll"]["paraphrase"], expected["nll"]["paraphrase"]):
        assert a["target_new"] == pytest.approx(b["target_new"], abs=1e-5)
    # with generation: a batch's records generate on the batch's edit, at most gen_records per decoding batch
    gcfg = BenchConfig(alg="SHIFT", hparams=hp, num_edits=2, gen_records=1, gen_max_length=30, neighborhood_kl=False)
    grun = _run(model, byte_tok, path, tmp_path / "gen", cfg=gcfg)
    gen = {p.name: json.loads(p.read_text())["metrics"]["generation"] for p in sorted(grun.glob("case_*.json"))}
    assert len(gen) == 3 and all(g["texts"] and g["ngram_entropy"] >= 0 for g in gen.values())
    rec1 = bdata.load_counterfact(path)[1]
    result = se.edit(model, byte_tok, [cases[0].request, cases[1].request], hp)
    try:
        seed = gcfg.seed * 1_000_003 + 1
        alone = bg.generate_topk(model, byte_tok, rec1.generation_prompts, max_length=30, seed=seed)
    finally:
        result.undo()
    assert gen["case_1.json"]["texts"] == alone
    # a resumed run with a missing record redoes its batch and writes only that record
    (run / "case_0.json").unlink()
    mtime = (run / "case_1.json").stat().st_mtime_ns
    assert _run(model, byte_tok, path, tmp_path / "out", cfg=cfg) == run
    assert (run / "case_0.json").is_file() and (run / "case_1.json").stat().st_mtime_ns == mtime


def test_run_labels_tell_locate_and_edit_settings_apart():
    from shift_edit.core.registry import run_tag

    assert run_tag("SHIFT", {"layers": [26], "eta": 60.0, "eta_scaling": "normalized"}) == " L26 eta 60 normalized"
    earlier = {"layers": [2, 3], "mom2_update_weight": 1500.0, "context_length_mode": "new", "v_step_count": "n",
               "key_average": "flat"}
    assert run_tag("MEMIT", earlier) == " L2,3 λ 1500 new-token contexts n steps flat keys"
    reference = {**earlier, "context_length_mode": "total", "v_step_count": "n_minus_1", "key_average": "per_type"}
    assert run_tag("MEMIT", reference) == " L2,3 λ 1500"
    memit = {"layers": [2, 3], "mom2_update_weight": 1500.0, "mom2_n_tokens": 200000, "mom2_adjustment": True}
    assert run_tag("MEMIT", memit) == " L2,3 λ 1500 C 200k tok"
    rome = {"layers": [5], "mom2_n_tokens": 20000, "mom2_adjustment": False, "optimise_through_update": True}
    assert run_tag("ROME", rome) == " L5 through-update"
    assert run_tag("ROME", {"layers": [5], "mom2_n_tokens": 200000,
                            "lambda_key": "prompt"}) == " L5 C 200k tok Λ-key prompt"
    assert run_tag("SHIFT_PLUS", {"layers": [23], "mom2_n_tokens": 50000,
                                  "margin": 0.25}) == " L23 C 50k tok margin 0.25"
    # a run of an algorithm not registered here (another toolkit's folder): layers, step and statistics
    assert run_tag("?", {"layers": [4], "lr": 0.5, "mom2_n_tokens": 1000}) == " L4 lr 0.5 C 1k tok"
    assert run_tag("SHIFT", None) == ""


def test_a_refused_edit_is_recorded_and_the_run_goes_on(byte_tok, tmp_path):
    """The edit guard refusing one record's edit does not end the run: that case says why, is measured
    on the unedited model (the edit never happened), and the summary's label counts it."""
    path = write(tmp_path, [rome_record(i, subject=f"S{i}q") for i in range(2)])
    model = tiny_model("llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    refusing = BenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**{**HP, "max_relative_norm": 1e-12}),
                           skip_generation=True)
    run_dir = _run(model, byte_tok, path, tmp_path / "out", cfg=refusing)
    cases = [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("case_*.json"))]
    assert len(cases) == 2 and all("max_relative_norm" in c["edit"]["refused"] for c in cases)
    assert all(not c["edit"]["applied"] for c in cases)
    unedited = _metrics(_run(tiny_model("llama"), byte_tok, path, tmp_path / "none",
                             cfg=BenchConfig(alg="NONE", hparams=None, skip_generation=True)))
    assert list(_metrics(run_dir).values()) == list(unedited.values())
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())
    from shift_edit.bench.summarize import summarize_run

    assert "2 refused by the edit guard" in summarize_run(run_dir)["label"]
