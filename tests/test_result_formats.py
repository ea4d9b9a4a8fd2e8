"""Result folders both ways: our run dir exported for ROME's/MEMIT's/EasyEdit's readers (their
summarize logic reimplemented here from their published key names), and ``shift-edit summarize``
reading ROME/MEMIT run folders and EasyEdit result files."""

from __future__ import annotations

import json

import pytest
from _rome_format import rome_record, rome_summarize
from _tiny import tiny_model

import shift_edit as se
from shift_edit.bench import counterfact as bdata
from shift_edit.bench.bench_config import BenchConfig
from shift_edit.bench.runner import run_bench
from shift_edit.bench.summarize import summarize_run
from shift_edit.cli import main
from shift_edit.compat.result_export import export_run
from shift_edit.compat.result_import import summarize_any


@pytest.fixture(scope="module")
def run_dir(byte_tok, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    path = tmp / "cf.json"
    path.write_text(json.dumps([rome_record(i, s) for i, s in enumerate(["Messi", "Kaka", "Pele", "Xavi"])]))
    cfg = BenchConfig(alg="SHIFT", hparams=se.ShiftHyperParams(layers=[1], eta=30.0, skip_if_predicted=False),
                      gen_max_length=16, gen_every=2, neighborhood_kl=False)
    return run_bench(tiny_model("llama"), byte_tok, bdata.load_counterfact(path), cfg, tmp / "results",
                     data_info={"path": str(path), "sha256": bdata.file_sha256(path)}, model_name="tiny-llama",
                     progress=False)


def test_rome_and_memit_summarize_read_the_export_with_our_numbers(run_dir, tmp_path):
    ours = summarize_run(run_dir)["metrics"]
    export_run(run_dir, tmp_path / "rome" / "run_000", "rome")
    export_run(run_dir, tmp_path / "memit" / "run_000", "memit")
    for d, pattern in (
        (tmp_path / "rome" / "run_000", "case_*.json"),
        (tmp_path / "memit" / "run_000", "*case_*.json"),
    ):
        theirs = rome_summarize(d, pattern)
        assert theirs["num_cases"] == 4
        for col, key in (
            ("ES", "post_rewrite_success"),
            ("PS", "post_paraphrase_success"),
            ("NS", "post_neighborhood_success"),
            ("EM", "post_rewrite_diff"),
            ("NM", "post_neighborhood_diff"),
        ):
            assert ours[col]["mean"] == pytest.approx(100 * theirs[key][0], abs=1e-9), col
        assert ours["S"]["mean"] == pytest.approx(100 * theirs["post_score"], rel=1e-9)
        assert ours["ngram_entropy"]["mean"] == pytest.approx(100 * theirs["post_ngram_entropy"][0])
    memit = rome_summarize(tmp_path / "memit" / "run_000", "*case_*.json")
    for col, key in (("efficacy_top1", "post_rewrite_acc"), ("paraphrase_top1", "post_paraphrase_acc"),
                     ("neighborhood_top1", "post_neighborhood_acc")):
        assert ours[col]["mean"] == pytest.approx(100 * memit[key][0]), col
    case = json.loads((tmp_path / "memit" / "run_000" / "1_edits-case_2.json").read_text())
    assert case["num_edits"] == 1 and case["grouped_case_ids"] == [2]
    # the data file is still there: requested_rewrite is its record, {str, id} targets
    assert case["requested_rewrite"]["target_new"] == {"str": "Paris", "id": "Q90"}


def test_shift_edit_summarize_reads_rome_folders_and_gives_the_same_numbers(run_dir, tmp_path, capsys):
    export_run(run_dir, tmp_path / "ROME" / "run_000", "rome")
    ours, theirs = summarize_run(run_dir)["metrics"], summarize_any(tmp_path / "ROME" / "run_000")["metrics"]
    for col in ("ES", "PS", "NS", "EM", "PM", "NM", "S", "ngram_entropy"):
        assert theirs[col]["mean"] == pytest.approx(ours[col]["mean"], abs=1e-9), col
    assert main(["summarize", str(tmp_path / "ROME" / "run_000"), str(run_dir), "--no-plot", "--common",
                 "--out", str(tmp_path / "sum")]) == 0
    assert "ROME-format folder (ROME/run_000: SHIFT L1 eta 30" in (tmp_path / "sum" / "summary.md").read_text()
    # ROME's --dir_name style: the folder of runs
    assert main(["summarize", str(tmp_path / "ROME"), "--no-plot", "--out", str(tmp_path / "sum2")]) == 0
    assert "ROME/run_000" in (tmp_path / "sum2" / "summary.md").read_text()


def test_easyedit_export_and_result_files(run_dir, tmp_path, byte_tok):
    (p,) = export_run(run_dir, tmp_path / "ee", "easyedit")
    data = json.loads(p.read_text())
    assert len(data) == 4 and {"case_id", "requested_rewrite", "time", "post"} <= set(data[0])
    assert data[0]["post"]["metric_meta"]["rewrite"]["comparable_group"] == "shift_edit.strict_top1"
    # an EasyEdit result file made by BaseEditor, summarised as EasyEdit token accuracy
    metrics, _, _ = se.BaseEditor(se.ShiftHyperParams(layers=[1], eta=30.0, skip_if_predicted=False),
                                  model=tiny_model("llama"), tok=byte_tok).edit(
        ["Messi plays for", "Kaka plays for"], ["Paris", "Rome"], rephrase_prompts=["Messi is with", "Kaka is with"],
        locality_inputs={"nb": {"prompt": ["Totti plays for"] * 2, "ground_truth": ["Rome"] * 2}}, verbose=False)
    f = tmp_path / "ROME_results.json"
    f.write_text(json.dumps(metrics))
    row = summarize_any(f)
    want = se.compat.easyedit_metrics.summary_metrics(json.loads(f.read_text()))["post"]
    assert row["metrics"]["ee_rewrite_acc"]["mean"] == pytest.approx(100 * want["rewrite_acc"])
    assert row["metrics"]["ee_locality"]["mean"] == pytest.approx(100 * want["locality"]["nb_acc"])
    assert row["protocol"]["comparable_groups"] == ["lm.decoder_only_teacher_forcing.token_accuracy",
                                                    "locality.lm.pre_post_argmax_token_match"]


@pytest.mark.parametrize("make", ["empty", "garbage_case", "bad_probs", "bad_easyedit", "export_into_run"])
def test_malformed_inputs_are_one_line_exit_2(run_dir, tmp_path, capsys, make):
    d = tmp_path / "x"
    d.mkdir()
    argv = ["summarize", str(d), "--no-plot"]
    if make == "garbage_case":
        (d / "case_1.json").write_text("{not json")
    elif make == "bad_probs":
        (d / "case_1.json").write_text(json.dumps({"case_id": 1, "time": 0, "post": {"rewrite_prompts_probs": [3]}}))
    elif make == "bad_easyedit":
        f = tmp_path / "r.json"
        f.write_text(json.dumps([{"post": {"locality": {}}}]))
        argv = ["summarize", str(f), "--no-plot"]
    elif make == "export_into_run":
        argv = ["export", str(run_dir), "--format", "rome", "--out", str(run_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
