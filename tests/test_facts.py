"""zsRE and KnowEdit in the benchmark: readers, each metric against a hand computation on 3 records (tiny
model), the EasyEdit facade's numbers equal the benchmark's ``easyedit`` family, sequential runs, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.bench.fact_metrics import flat_values, summarize_easyedit
from shift_edit.bench.fact_runner import FactBenchConfig, run_fact_bench
from shift_edit.bench.fact_sequential import FactScoring
from shift_edit.bench.facts import detect_format, load_facts
from shift_edit.bench.generation import ngram_entropy
from shift_edit.bench.sequential import SequentialConfig, run_sequential
from shift_edit.compat import easyedit_metrics as see
from shift_edit.files import data_files as sdata

REPO = Path(__file__).resolve().parents[1]
HP = dict(layers=[1], eta=40.0, skip_if_predicted=False, max_relative_norm=None)


def zsre_records(n: int = 3) -> list[dict]:
    objs = ["Paris", "Rome", "Oslo"]
    return [{"subject": f"Sub{i}", "src": f"Where is Sub{i} located?", "rephrase": f"Sub{i} is located in which city?",
             "alt": objs[(i + 1) % 3], "answers": [objs[i % 3]], "loc": f"nq question: who wrote book {i}",
             "loc_ans": "Ann Lee"} for i in range(n)]


def knowedit_records(n: int = 3) -> list[dict]:
    objs = ["Paris", "Rome", "Oslo"]
    out = []
    for i in range(n):
        rec = {
            "subject": f"Sub{i}",
            "prompt": f"The city of Sub{i} is",
            "target_new": objs[i % 3],
            "ground_truth": [objs[(i + 1) % 3]],
            "rephrase_prompt": f"Sub{i} lies in the city of",
            "locality": {
                "Relation_Specificity": [
                    {"prompt": f"The owner of Sub{i} is", "ground_truth": ["Bob"]},
                    {"prompt": f"Sub{i} was built by", "ground_truth": [["Al", "Alf"]]},
                ]
            },
            "portability": {"Reasoning": [{"prompt": f"The country of the city of Sub{i} is", "ground_truth": "Land"}]},
        }
        if i == 1:
            rec["portability"]["Subject_Aliasing"] = [{"prompt": f"The city of S{i} is", "ground_truth": objs[1]}]
        out.append(rec)
    return out


def write(tmp_path: Path, recs, name: str) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(recs))
    return p


# --------------------------------------------------------------------------- hand computations

@torch.no_grad()
def hand_memit(model, tok, prompt: str, answer: str) -> list[bool]:
    """MEMIT's test_batch_prediction_acc written out, one plain forward pass per answer token: the argmax after
    tok(prompt + decode(ans[:i])) against the first id of tok(decode(ans[i]))."""
    ans = tok(" " + answer, add_special_tokens=False).input_ids
    out = []
    for i in range(len(ans)):
        ids = tok(prompt + tok.decode(ans[:i])).input_ids
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        out.append(int(logits.argmax()) == tok(tok.decode(ans[i]), add_special_tokens=False).input_ids[0])
    return out


def hand_zsre(model, tok, rec: dict) -> dict[str, list[bool]]:
    """MEMIT's zsRE scoring written out: ' '+answers[0] tokenised alone; loc + '?' against ' '+loc_ans."""
    return {"efficacy": hand_memit(model, tok, rec["src"], rec["answers"][0]),
            "generalization": hand_memit(model, tok, rec["rephrase"], rec["answers"][0]),
            "specificity": hand_memit(model, tok, rec["loc"] + "?", rec["loc_ans"])}


@torch.no_grad()
def hand_ee(model, tok, prompt: str, target: str) -> tuple[float, list[int]]:
    """EasyEdit's token accuracy written out: tok(prompt + ' ' + target), the first len(tok(prompt)) are the prompt."""
    full = tok(f"{prompt} {target}").input_ids
    n = len(tok(prompt).input_ids)
    logits = model(input_ids=torch.tensor([full])).logits[0]
    arg = [int(logits[j - 1].argmax()) for j in range(n, len(full))]
    return sum(a == t for a, t in zip(arg, full[n:])) / len(arg), arg


def _mean(xs):
    return sum(xs) / len(xs)


def _edit(model, tok, case):
    return se.edit(model, tok, [case.request], se.ShiftHyperParams(**HP))


def test_zsre_metrics_equal_a_hand_computation_on_3_records(byte_tok, tmp_path):
    recs = zsre_records()
    path = write(tmp_path, recs, "zsre.json")
    assert detect_format(recs, path) == "zsre"
    cases = load_facts(path)
    assert [c.request.target_new for c in cases] == [" Paris", " Rome", " Oslo"]  # answers[0], as MEMIT edits
    model = tiny_model("llama")
    cfg = FactBenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), dataset="zsre", fmt="zsre")
    run = run_fact_bench(model, byte_tok, cases, cfg, tmp_path / "out", data_info={"sha256": "x"},
                         model_name="tiny", progress=False)
    params = json.loads((run / "params.json").read_text())
    assert set(params["match"]["protocol"]["metric_families"]) == {"zsre_token_acc", "zsre_top1"}
    for i, (rec, case) in enumerate(zip(recs, cases)):
        got = json.loads((run / f"case_{i}.json").read_text())
        assert got["dataset"] == "zsre" and got["edit"]["applied"]
        result = _edit(model, byte_tok, case)  # the same deterministic edit, scored by hand
        try:
            hand = hand_zsre(model, byte_tok, rec)
        finally:
            result.undo()
        for name, bits in hand.items():
            assert got["metrics"]["zsre_token_acc"][name] == pytest.approx(_mean(bits), abs=1e-9), (i, name)
            assert got["metrics"]["zsre_top1"][name] == float(all(bits)), (i, name)
        assert got["metrics"]["zsre_token_acc"]["correct"]["rewrite"] == hand["efficacy"]
        assert "rome" not in got["metrics"] and "easyedit" not in got["metrics"]  # never mixed


def test_knowedit_metrics_equal_a_hand_computation_and_the_facade(byte_tok, tmp_path):
    recs = knowedit_records()
    path = write(tmp_path, recs, "know.json")
    assert detect_format(recs, path) == "knowedit"
    cases = load_facts(path)
    assert cases[0].ee_request["locality"]["Relation_Specificity"]["ground_truth"] == ["Bob", "Al"]  # first alias
    model = tiny_model("llama")
    cfg = FactBenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), dataset="know", fmt="knowedit",
                          fluency=False)
    run = run_fact_bench(model, byte_tok, cases, cfg, tmp_path / "out", data_info={"sha256": "x"},
                         model_name="tiny", progress=False)
    editor = se.BaseEditor(se.ShiftHyperParams(**HP), model=model, tok=byte_tok)
    facade, _, _ = editor.edit_requests([c.ee_request for c in cases], verbose=False)
    for i, (rec, case) in enumerate(zip(recs, cases)):
        got = json.loads((run / f"case_{i}.json").read_text())["metrics"]["easyedit"]
        # the facade (EasyEdit's BaseEditor.edit_requests) gives the same numbers
        assert flat_values({"easyedit": summarize_easyedit(facade[i]["post"])}) == flat_values({"easyedit": got})
        ee = case.ee_request
        pre_loc = [
            hand_ee(model, byte_tok, p, t)[1]
            for p, t in zip(
                ee["locality"]["Relation_Specificity"]["prompt"], ee["locality"]["Relation_Specificity"]["ground_truth"]
            )
        ]
        result = _edit(model, byte_tok, case)
        try:
            rewrite = hand_ee(model, byte_tok, rec["prompt"], rec["target_new"])[0]
            rephrase = hand_ee(model, byte_tok, rec["rephrase_prompt"], rec["target_new"])[0]
            ports = {k: _mean([hand_ee(model, byte_tok, p, t)[0] for p, t in zip(v["prompt"], v["ground_truth"])])
                     for k, v in ee["portability"].items()}
            post_loc = [
                hand_ee(model, byte_tok, p, t)[1]
                for p, t in zip(
                    ee["locality"]["Relation_Specificity"]["prompt"],
                    ee["locality"]["Relation_Specificity"]["ground_truth"],
                )
            ]
        finally:
            result.undo()
        loc = _mean([_mean([a == b for a, b in zip(u, v)]) for u, v in zip(pre_loc, post_loc)])
        assert got["rewrite_acc"] == pytest.approx(rewrite) and got["rephrase_acc"] == pytest.approx(rephrase)
        assert got["portability_keys"] == pytest.approx(ports)
        assert got["portability"] == pytest.approx(_mean(list(ports.values())))
        assert got["locality_keys"]["Relation_Specificity"] == pytest.approx(loc) == got["locality"]
    cols = flat_values(json.loads((run / "case_1.json").read_text())["metrics"])
    assert {"ee_rewrite_acc", "ee_portability_Reasoning", "ee_portability_Subject_Aliasing",
            "ee_locality_Relation_Specificity"} <= set(cols)


def test_unedited_knowedit_locality_is_one_and_fluency_is_the_ngram_entropy(byte_tok, tmp_path):
    path = write(tmp_path, knowedit_records(2), "know.json")
    model = tiny_model("llama")
    cfg = FactBenchConfig(alg="NONE", hparams=None, dataset="know", fmt="knowedit", fluency=True)
    run = run_fact_bench(model, byte_tok, load_facts(path), cfg, tmp_path / "out", data_info={"sha256": "x"},
                         model_name="tiny", progress=False)
    got = json.loads((run / "case_0.json").read_text())["metrics"]["easyedit"]
    assert got["locality"] == 1.0
    want = see.fluency(model, byte_tok, ["The city of Sub0 is"], seed=0)["ngram_entropy"]
    assert got["fluency"] == pytest.approx(want)
    # the bench keeps the sampled texts beside the number; EasyEdit's own output format does not carry them
    kept = see.fluency(model, byte_tok, ["The city of Sub0 is"], seed=0, keep_text=True)
    assert got["fluency_text"] == kept["text"] and len(kept["text"]) == 1
    assert kept["text"][0].startswith("The city of Sub0 is") and ngram_entropy(kept["text"]) == pytest.approx(want)
    plain = see.compute_edit_quality(model, byte_tok, {"prompt": "The city of Sub0 is", "target_new": " Sub1"},
                                     test_generation=True)
    assert set(plain["fluency"]) == {"ngram_entropy"}


@pytest.mark.parametrize("fmt", ["zsre", "knowedit"])
def test_sequential_facts_checkpoints_and_unedited_reference(byte_tok, tmp_path, fmt):
    recs = zsre_records(3) if fmt == "zsre" else knowedit_records(3)
    path = write(tmp_path, recs, f"{fmt}.json")
    cases = load_facts(path)
    model = tiny_model("llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SequentialConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), total=3, batch_edits=2, eval_at=[1],
                           ppl=False, skip_wild=True)
    run = run_sequential(model, byte_tok, cases, cfg, tmp_path / "out", data_info={"sha256": "x"}, model_name="tiny",
                         progress=False, scoring=FactScoring(fmt, fmt))
    params = json.loads((run / "params.json").read_text())
    fams = params["match"]["protocol"]["metric_families"]
    assert "rome" not in fams and params["match"]["protocol"]["dataset"] == fmt
    ck = json.loads((run / "checkpoints" / "ckpt_3.json").read_text())
    key = "zsre_efficacy" if fmt == "zsre" else "ee_rewrite_acc"
    assert ck["metrics"][key]["n"] == 3 and ck["unedited_metrics"][key]["n"] == 3
    assert "ES" not in ck["metrics"]
    if fmt == "knowedit":  # the unedited reference agrees with itself
        assert ck["unedited_metrics"]["ee_locality"]["mean"] == 100.0
    # the unedited reference equals scoring the unedited model directly
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(w0[n])
    scoring = FactScoring(fmt, fmt)
    base = scoring.score(model, byte_tok, scoring.prepare(model, byte_tok, cases), 64)
    assert ck["unedited_metrics"][key]["mean"] == pytest.approx(100 * _mean([b[key] for b in base]))
    assert any(not torch.equal(edited[n], w0[n]) for n in w0)


def test_sequential_facts_refuse_the_wild_family(byte_tok, tmp_path):
    path = write(tmp_path, zsre_records(2), "z.json")
    cfg = SequentialConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), total=2, ppl=False)
    with pytest.raises(se.ShiftEditError, match="skip-wild"):
        run_sequential(tiny_model("llama"), byte_tok, load_facts(path), cfg, tmp_path / "o", data_info={},
                       model_name="tiny", progress=False, scoring=FactScoring("zsre", "z"))


# --------------------------------------------------------------------------- bad input, data files

def _cli(args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "shift_edit", *args], capture_output=True, text=True, env=env,
                          cwd=REPO)


@pytest.mark.parametrize("fmt,bad,match", [
    ("zsre", {"answers": []}, "record 1"),
    ("zsre", {"loc": "no prefix"}, "record 1"),
    ("knowedit", {"locality": {"Relation_Specificity": [{"prompt": "p"}]}}, "record 1"),
    ("knowedit", {"target_new": ""}, "record 1"),
])
def test_a_malformed_record_is_one_line_naming_file_and_index(tmp_path, fmt, bad, match):
    recs = zsre_records(3) if fmt == "zsre" else knowedit_records(3)
    recs[1].update(bad)
    path = write(tmp_path, recs, "bad.json")
    with pytest.raises(se.ShiftEditError, match=match) as err:
        load_facts(path, fmt=fmt)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_cli_malformed_record_exits_2_with_one_line(tmp_path):
    recs = zsre_records(3)
    del recs[2]["rephrase"]
    path = write(tmp_path, recs, "bad.json")
    r = _cli(["bench", "--alg", "NONE", "--model", "smollm2-135m", "--data", str(path), "--out", str(tmp_path / "o")])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "record 2" in lines[0]
    assert not (tmp_path / "o").exists()


def test_shared_zsre_and_knowedit_files_read(shared_data):
    sizes = {"zsre/zsre-mend-eval-portability1037.json": 1037, "knowedit/ZsRE-test-all.json": 1301,
             "knowedit/wiki_recent-train.json": 570, "knowedit/wiki_counterfact-train.json": 1427}
    for rel, n in sizes.items():
        if not (shared_data / rel).is_file():
            pytest.skip(f"{rel} not in the shared data")
        cases = load_facts(shared_data / rel)
        assert len(cases) == n, rel
    assert sdata.find_data("knowedit-recent") == shared_data / "knowedit/wiki_recent-train.json"


def test_fetch_zsre_checks_the_git_blob_id(tmp_path):
    src = tmp_path / "src.json"
    src.write_text("[]")
    with pytest.raises(se.ShiftEditError, match="git blob id"):
        sdata.fetch_data("zsre", tmp_path / "dest", url=src.as_uri())
    assert not list((tmp_path / "dest").rglob("*.json"))
    assert sdata.git_blob_id(src) == "0637a088a01e8ddab3bf3fa98dbe804cbde1a0dc"  # `git hash-object` of "[]"


# --------------------------------------------------------------------------- CounterFact portability, summaries

def test_counterfact_portability_is_easyedit_token_accuracy_on_records_that_have_it(byte_tok, tmp_path):
    from test_bench import rome_record

    from shift_edit.bench import counterfact as bdata
    from shift_edit.bench.bench_config import BenchConfig
    from shift_edit.bench.runner import run_bench

    recs = [rome_record(i, subject=f"Sub{i}") for i in range(3)]
    for r in recs[:2]:
        r["portability"] = {"New Question": f"Which team does {r['requested_rewrite']['subject']} join?",
                            "New Answer": "Paris FC"}
    path = write(tmp_path, recs, "cf.json")
    model = tiny_model("llama")
    cfg = BenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), skip_generation=True, skip_wild=True,
                      neighborhood_kl=False, portability=True)
    run = run_bench(model, byte_tok, bdata.load_counterfact(path), cfg, tmp_path / "out", data_info={"sha256": "x"},
                    model_name="tiny", rank=0, world_size=1, progress=False)
    assert (
        "easyedit_portability" in json.loads((run / "params.json").read_text())["match"]["protocol"]["metric_families"]
    )
    assert "easyedit_portability" not in BenchConfig(alg="NONE", hparams=None).protocol()["metric_families"]
    cases = bdata.load_counterfact(path)
    for i in range(3):
        got = json.loads((run / f"case_{i}.json").read_text())["metrics"]
        if i == 2:
            assert "easyedit_portability" not in got
            continue
        result = se.edit(model, byte_tok, [cases[i].request], se.ShiftHyperParams(**HP))
        try:
            want = hand_ee(model, byte_tok, recs[i]["portability"]["New Question"], "Paris FC")[0]
        finally:
            result.undo()
        assert got["easyedit_portability"]["acc"] == pytest.approx(want)
        assert set(got) >= {"rome", "top1"}  # the CounterFact families beside it, each under its own name


def test_summarize_gives_one_table_per_data_set_and_fact_curves(byte_tok, tmp_path):
    from shift_edit.bench.seq_summary import curves, summarize_sequential
    from shift_edit.bench.summarize import load_reference, summarize_run, to_markdown_by_dataset

    model = tiny_model("llama")
    rows = []
    for fmt, recs in (("zsre", zsre_records(2)), ("knowedit", knowedit_records(2))):
        path = write(tmp_path, recs, f"{fmt}.json")
        cfg = FactBenchConfig(alg="NONE", hparams=None, dataset=f"my-{fmt}", fmt=fmt, fluency=False)
        rows.append(summarize_run(run_fact_bench(model, byte_tok, load_facts(path), cfg, tmp_path / fmt,
                                                 data_info={"sha256": "x"}, model_name="tiny", progress=False)))
    ref = tmp_path / "ref.json"
    ref.write_text(
        json.dumps(
            {
                "source": "paper",
                "model": "GPT-J",
                "n": 10,
                "dataset": "my-zsre",
                "metric_family": "zsre_token_acc",
                "rows": [{"alg": "ROME", "metrics": {"zsre_efficacy": 90.0}}],
            }
        )
    )
    rows += load_reference(ref)
    md = to_markdown_by_dataset(rows)
    zsre_part, know_part = md.split("## my-knowedit")
    assert "## my-zsre" in zsre_part and "zsre_efficacy" in zsre_part and "ee_rewrite_acc" not in zsre_part
    assert "published (ROME, GPT-J" in zsre_part and "published" not in know_part
    assert "ee_locality_Relation_Specificity" in know_part and "zsre_" not in know_part.split("Families")[0]
    assert rows[1]["metrics"]["ee_locality"]["mean"] == 100.0
    path = write(tmp_path, zsre_records(2), "zseq.json")
    cfg = SequentialConfig(alg="SHIFT", hparams=se.ShiftHyperParams(**HP), total=2, ppl=False, skip_wild=True)
    run = run_sequential(model, byte_tok, load_facts(path), cfg, tmp_path / "seq", data_info={}, model_name="tiny",
                         progress=False, scoring=FactScoring("zsre", "zsre"))
    seq_rows = summarize_sequential(run)
    assert seq_rows[0]["dataset"] == "zsre" and "zsre_specificity" in seq_rows[0]["metrics"]
    from shift_edit.bench.seq_summary import plot_curves
    from shift_edit.bench.summarize import bar_chart

    assert bar_chart(rows[:2], tmp_path / "bars.png").stat().st_size > 0
    assert bar_chart(rows, tmp_path / "bars_ref.png").stat().st_size > 0  # with the published rows
    names = {p.name for p in plot_curves(curves([run]), tmp_path / "plots")}
    assert "retention_zsre.png" in names
    crow = curves([run])[0]
    assert crow["dataset"] == "zsre" and crow["zsre_efficacy"] is not None and "unedited_zsre_efficacy" in crow


def test_cli_single_sequential_and_summarize_on_fact_files(byte_tok, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    hp = tmp_path / "hp.yaml"
    hp.write_text("alg_name: SHIFT\nlayers: [1]\neta: 40.0\nskip_if_predicted: false\nmax_relative_norm: null\n")
    z = write(tmp_path, zsre_records(3), "z.json")
    k = write(tmp_path, knowedit_records(2), "k.json")
    out = tmp_path / "res"
    common = ["--model", str(folder), "--out", str(out), "--no-progress"]
    for args in (["bench", "--alg", "NONE", "--data", str(z)],
                 ["bench", "--alg", "SHIFT", "--hparams", str(hp), "--data", str(k), "--skip-generation"],
                 ["bench", "--alg", "SHIFT", "--hparams", str(hp), "--data", str(z), "--sequential", "3",
                  "--batch-edits", "2", "--ppl-lines", "0"]):
        r = _cli(args + common)
        assert r.returncode == 0, r.stderr
    r = _cli(["bench", "--alg", "NONE", "--data", str(k), "--case-ids", "0"] + common)
    assert r.returncode == 2 and "--case-ids" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli(["summarize", str(out / "NONE" / "run_000"), str(out / "SHIFT" / "run_000"),
              str(out / "SHIFT" / "seq_000"),
              "--out", str(tmp_path / "sum"), "--no-plot"])
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert "## z\n" in md and "## k\n" in md
    assert md.index("zsre_efficacy") < md.index("## k\n") < md.index("ee_rewrite_acc")
    curves = (tmp_path / "sum" / "curves.csv").read_text()
    assert "zsre_efficacy" in curves.splitlines()[0]


def test_export_refuses_a_fact_run_in_one_line(byte_tok, tmp_path):
    from shift_edit.compat.result_export import export_run

    path = write(tmp_path, zsre_records(1), "z.json")
    cfg = FactBenchConfig(alg="NONE", hparams=None, dataset="zsre", fmt="zsre")
    run = run_fact_bench(tiny_model("llama"), byte_tok, load_facts(path), cfg, tmp_path / "o", data_info={},
                         model_name="tiny", progress=False)
    with pytest.raises(se.ShiftEditError, match="a zsre run"):
        export_run(run, tmp_path / "exp", "rome")
    assert not (tmp_path / "exp").exists()


def test_chart_legend_is_short_for_published_rows():
    from shift_edit.bench.summarize import legend_labels

    source = "published (ROME, GPT-J, N=10000, single edits; ROME Table 1, as its authors publish it in their paper)"
    pub = {"kind": "published", "alg": "ROME", "model": "GPT-J", "label": source}
    mine = {"kind": "measured", "alg": "SHIFT", "model": "tiny", "label": "measured here (SHIFT L1, tiny, N=3)"}
    assert legend_labels([mine, pub]) == [mine["label"], "published (ROME, GPT-J)"]
    # two published rows of one method and model (two settings): the short form would not tell them apart
    assert legend_labels([pub, dict(pub, label=source + " x")]) == [source, source + " x"]
    assert legend_labels([mine], width=10) == ["measured \u2026"]
