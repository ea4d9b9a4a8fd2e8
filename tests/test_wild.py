"""The WILD-style free-generation family: the success rule by hand, the greedy decoder against a naive
argmax loop, and the family in single-edit and sequential run files and summaries."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_model
from test_bench import _metrics, _run, easyedit_record, rome_record, write

import shift_edit as se
from shift_edit.bench import counterfact as bdata
from shift_edit.bench import wild as bw
from shift_edit.bench.bench_config import BenchConfig
from shift_edit.bench.generation import GenerationGroup
from shift_edit.bench.summarize import summarize_run, to_csv, to_markdown
from shift_edit.core.requests import encode_prompt

# ----------------------------------------------------------------------------- the success rule by hand

@pytest.mark.parametrize("text, new, true, want", [
    (" Paris, and later Rome.", " Paris", " Rome", True),           # new before true
    (" Rome, and later Paris.", " Paris", " Rome", False),          # true before new
    (" Madrid, of course.", " Paris", " Rome", False),              # neither
    (" in Paris.", " Paris", " Rome", True),                        # new only
    (" in Rome.", " Paris", " Rome", False),                        # true only
    ("\n  PARIS\t is it", " paris", " Rome", True),                 # case, whitespace
    (" the city of new\n\n york   city!", " New York City", " London", True),   # multi-word, collapsed
    (" the city of New York City", " New York City", " New York", True),      # the longer object at one place wins
    (" the city of New York City", " New York", " New York City", False),     # ... and counts against the shorter
    (" British India then India", " British India", " India", True),          # true only inside the new object
    (" British India", " India", " British India", False),
    (" Ｐａｒｉｓ ﬁrst", " Paris", " Rome", True),                   # NFKC: full-width letters
    (" a woman from Spain", " Oman", " Spain", False),              # whole words only
    (" Romeo then Rome", " Rome", " Paris", True),
    (" Romeo", " Rome", " Paris", False),
    ("", " Paris", " Rome", False),
])
def test_success_rule_by_hand(text, new, true, want):
    assert bw.appears_first(text, new, true) is want


def test_normalise_and_first_index():
    assert bw.normalise("  A\u00a0B\n\tc ") == "a b c"  # NFKC turns the no-break space into a space
    assert bw.first_index("x Paris y", "paris") == 2 and bw.first_index("Parisian", "Paris") is None
    assert bw.first_index("anything", "   ") is None


def test_record_metrics_are_means_over_prompts():
    case = bdata.parse_case(rome_record(1, new="Paris", true="Rome"), 0)
    spec = bw.wild_prompts(case, neighborhood=True)
    assert list(spec.prompts) == ["rewrite", "paraphrase", "neighborhood"]
    assert spec.objects["neighborhood"] == (case.neighborhood_true, " Paris")
    texts = [" Paris", " Rome then Paris", " Paris!", " Rome", " Paris", " nothing"]
    m = bw.wild_metrics(spec, texts)
    assert m["rewrite_success"] == 1.0 and m["paraphrase_success"] == 0.5
    assert m["neighborhood_success"] == pytest.approx(1 / 3)  # neighborhood: the TRUE object must come first
    assert m["hits"]["paraphrase"] == [False, True] and m["texts"]["neighborhood"] == texts[3:]
    ee = bw.wild_prompts(bdata.parse_case(easyedit_record(), 0))
    assert list(ee.prompts) == ["rewrite", "rephrase"]


# ----------------------------------------------------------------------------- the decoder

def naive_greedy(model, tok, prompt: str, n: int, stop: set[int]) -> list[int]:
    """One token at a time, the whole sequence each step, no cache, no padding."""
    ids = encode_prompt(tok, prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].float().argmax())
            if t in stop:
                break
            out.append(t)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_decoder_equals_a_naive_loop(byte_tok, arch):
    model = tiny_model(arch)
    prompts = [["ab", "a much longer prompt here"], ["xyz q"], ["Paris is the capital of"]]
    groups = [GenerationGroup(p, 0) for p in prompts]
    stop = bw._stop_ids(model, byte_tok)
    want = [[naive_greedy(model, byte_tok, p, 12, stop) for p in g] for g in prompts]
    assert bw.greedy_continuations(model, byte_tok, groups, max_new_tokens=12) == want
    assert all(len(r) == 12 for g in want for r in g)  # a random model never says EOS here
    # a token the first row produces at its 4th step made an EOS: that row ends before its first
    # occurrence, rows without it go on
    eos = want[0][0][3]
    model.generation_config.eos_token_id = [256, eos]
    stop = bw._stop_ids(model, byte_tok)
    cut = [[naive_greedy(model, byte_tok, p, 12, stop) for p in g] for g in prompts]
    assert cut[0][0] == want[0][0][: want[0][0].index(eos)]
    assert all(c == w for cg, wg in zip(cut, want) for c, w in zip(cg, wg) if eos not in w)
    assert bw.greedy_continuations(model, byte_tok, groups, max_new_tokens=12) == cut
    one = bw.greedy_continuations(model, byte_tok, [GenerationGroup(["ab"], 0)], max_new_tokens=12)
    assert one == [[cut[0][0]]]  # every row ended: decoding stopped early, same ids


def test_greedy_decoder_with_each_records_edit_on_its_rows(byte_tok):
    from shift_edit.studies.common import temporarily_applied

    model = tiny_model("llama")
    hp = se.ShiftHyperParams(layers=[1], eta=40.0, skip_if_predicted=False)
    delta = (
        se.get_algorithm("SHIFT")
        .compute(model, byte_tok, [se.make_request({"prompt": "ab plays", "target_new": "Paris"})], hp)
        .deltas
    )
    groups = [GenerationGroup(["ab plays", "xy"], 0, delta), GenerationGroup(["ab plays"], 0)]
    got = bw.greedy_continuations(model, byte_tok, groups, max_new_tokens=10)
    stop = bw._stop_ids(model, byte_tok)
    with temporarily_applied(model, delta):
        assert got[0] == [naive_greedy(model, byte_tok, p, 10, stop) for p in groups[0].prompts]
    assert got[1] == [naive_greedy(model, byte_tok, "ab plays", 10, stop)]
    assert got[0][0] != got[1][0]  # the edit shows on its own rows only


# ----------------------------------------------------------------------------- in the harness

HP = dict(layers=[1], eta=2.0, skip_if_predicted=False)


def test_single_edit_runs_write_the_family(byte_tok, tmp_path):
    model = tiny_model("llama")
    recs = [rome_record(i, subject=f"S{i}") for i in range(3)] + [easyedit_record(9)]
    path = write(tmp_path, recs)
    cfg = BenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), skip_generation=True, neighborhood_kl=False,
                      wild_max_new_tokens=6, wild_neighborhood=True, wild_records=2)
    run = _run(model, byte_tok, path, tmp_path / "res", cfg=cfg, rank=0, world_size=1)
    params = json.loads((run / "params.json").read_text())["match"]["protocol"]
    assert params["metric_families"]["wild"].startswith("WILD-style free generation")
    assert params["wild"]["max_new_tokens"] == 6 and params["wild"]["neighborhood"] is True
    metrics = _metrics(run)
    cases = {c.case_id: c for c in bdata.load_counterfact(path)}
    for name, m in metrics.items():
        w = m["wild"]
        case = cases[int(name[5:-5])]
        spec = bw.wild_prompts(case, neighborhood=True)
        # the texts are the greedy continuations of the edited model (edit made again, applied to the weights)
        res = se.edit(model, byte_tok, case.request, cfg.hparams)
        try:
            ids = bw.greedy_continuations(model, byte_tok, [GenerationGroup(spec.flat, 0)], max_new_tokens=6)[0]
        finally:
            res.undo()
        assert [t for g in spec.prompts for t in w["texts"][g]] == [
            byte_tok.decode(r, skip_special_tokens=True) for r in ids
        ]
        assert {k: v for k, v in w.items() if k.endswith("_success")} == {
            k: v
            for k, v in bw.wild_metrics(spec, [byte_tok.decode(r, skip_special_tokens=True) for r in ids]).items()
            if k.endswith("_success")
        }
    s = summarize_run(run)
    for col, group in (
        ("gen_efficacy", "rewrite"),
        ("gen_paraphrase", "paraphrase"),
        ("gen_neighborhood", "neighborhood"),
    ):
        vals = [100 * m["wild"][f"{group}_success"] for m in metrics.values() if f"{group}_success" in m["wild"]]
        assert s["metrics"][col]["mean"] == pytest.approx(sum(vals) / len(vals)) and s["metrics"][col]["n"] == len(vals)
    assert s["metrics"]["gen_rephrase"]["n"] == 1 and s["metrics"]["gen_paraphrase"]["n"] == 3
    md, csv = to_markdown([s]), to_csv([s])
    assert "gen_efficacy" in md.splitlines()[0] and "WILD-style" in md and ",gen_paraphrase," in csv
    # off: no family in the protocol (earlier runs' match keys unchanged), none in the case files, own run dir
    off = BenchConfig(alg="NONE", hparams=None, skip_generation=True, skip_wild=True)
    assert "wild" not in off.protocol() and "wild" not in off.protocol()["metric_families"]
    run_off = _run(model, byte_tok, path, tmp_path / "res", cfg=off, rank=0, world_size=1)
    assert all("wild" not in m for m in _metrics(run_off).values())
    base = _run(model, byte_tok, path, tmp_path / "res", rank=0, world_size=1,
                cfg=BenchConfig(alg="NONE", hparams=None, skip_generation=True, wild_max_new_tokens=6))
    assert base != run_off and all(m["wild"]["texts"]["rewrite"] for m in _metrics(base).values())
    assert "gen_neighborhood" not in summarize_run(base)["metrics"]  # neighborhood is opt-in
    with pytest.raises(se.ShiftEditError, match="--wild-records must be >= 1, got 0"):
        BenchConfig(alg="NONE", hparams=None, wild_records=0)


def test_sequential_checkpoints_carry_the_family(byte_tok, tmp_path):
    from test_sequential import _records
    from test_sequential import _run as seq_run

    path = write(tmp_path, _records(3))
    model = tiny_model("llama")
    base = tiny_model("llama")
    run_dir = seq_run(model, byte_tok, path, tmp_path / "out", total=3, batch_edits=2, eval_at=[1], ppl=False,
                      wild_max_new_tokens=5)
    ck = json.loads((run_dir / "checkpoints" / "ckpt_3.json").read_text())
    params = json.loads((run_dir / "params.json").read_text())["match"]["protocol"]
    assert "wild" in params["metric_families"] and params["wild"]["max_new_tokens"] == 5
    cases = bdata.load_counterfact(path)
    specs = [bw.wild_prompts(c) for c in cases]
    for model_, key in ((model, "metrics"), (base, "unedited_metrics")):
        got = bw.run_wild(model_, byte_tok, [bw.WildJob(s) for s in specs], max_new_tokens=5)
        for col, group in (("gen_efficacy", "rewrite"), ("gen_paraphrase", "paraphrase")):
            want = 100 * sum(m[f"{group}_success"] for m, _ in got) / 3
            assert ck[key][col]["mean"] == pytest.approx(want, abs=1e-9) and ck[key][col]["n"] == 3
        if key == "metrics":
            assert [r["wild_texts"] for r in ck["records"]] == [m["texts"] for m, _ in got]
    assert ck["speed"]["wild_s_per_record"] > 0
    from shift_edit.bench.seq_summary import curves, summarize_sequential

    rows = summarize_sequential(run_dir)
    assert "gen_efficacy" in rows[0]["metrics"] and "gen_paraphrase" in rows[1]["metrics"]
    assert [r["n_edits"] for r in curves([run_dir])] == [2, 3]
    assert all("gen_efficacy" in r and "unedited_gen_paraphrase" in r and r["wild_s_per_record"] > 0
               for r in curves([run_dir]))


@pytest.mark.parametrize("extra, msg", [
    (["--wild-max-new-tokens", "0"], "--wild-max-new-tokens must be >= 1"),
    (["--wild-records", "0"], "--wild-records must be >= 1"),
    (["--sequential", "1", "--wild-max-new-tokens", "0"], "--wild-max-new-tokens must be >= 1"),
])
def test_cli_bad_wild_options_exit_2(tmp_path, capsys, extra, msg):
    from shift_edit.cli import main

    data = write(tmp_path, [rome_record(1)])
    args = ["bench", "--alg", "FT" if "--sequential" in extra else "NONE", "--model", "smollm2-135m",
            "--data", str(data), "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded
