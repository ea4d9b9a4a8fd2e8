"""ROME's and MEMIT's run folders as their ``experiments/evaluate.py`` leaves them: the hparams
file copied in as ``params.json``, ``case_<id>.json`` (ROME) or ``<n>_edits-case_<id>.json``
(MEMIT) case files. ``shift-edit summarize`` tells them from our run folders by content, gives
the numbers ROME's/MEMIT's summarize gives, and names both readings of a folder that reads two
ways. The fixtures are authored here from Python dicts (their shape, our numbers)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from _rome_format import rome_record, rome_summarize
from _tiny import tiny_model

import shift_edit as se
from shift_edit.bench import counterfact as bdata
from shift_edit.bench.bench_config import BenchConfig
from shift_edit.bench.runner import run_bench
from shift_edit.bench.summarize import summarize_run
from shift_edit.cli import main
from shift_edit.compat.result_import import kind_of, summarize_any

# the hparams fields ROME's and MEMIT's evaluate.py copy into params.json (values made up for the tests)
ROME_HPARAMS = {"layers": [5], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.5, "v_loss_layer": 11,
                "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": True,
                "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
                "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
                "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte", "mom2_dataset": "wikipedia",
                "mom2_n_samples": 100000, "mom2_dtype": "float32"}
MEMIT_HPARAMS = {**ROME_HPARAMS, "layers": [3, 4, 5, 6], "layer_selection": "all", "clamp_norm_factor": 0.75,
                 "mom2_update_weight": 15000, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"}
COLUMNS = (("ES", "post_rewrite_success"), ("PS", "post_paraphrase_success"), ("NS", "post_neighborhood_success"),
           ("EM", "post_rewrite_diff"), ("PM", "post_paraphrase_diff"), ("NM", "post_neighborhood_diff"),
           ("ngram_entropy", "post_ngram_entropy"))
TOP1 = (("efficacy_top1", "post_rewrite_acc"), ("paraphrase_top1", "post_paraphrase_acc"),
        ("neighborhood_top1", "post_neighborhood_acc"))


def _probs(rng: random.Random, n: int) -> list[dict[str, float]]:
    return [{"target_new": round(rng.uniform(0.5, 8.0), 4), "target_true": round(rng.uniform(0.5, 8.0), 4)}
            for _ in range(n)]


def _requested_rewrite(case_id: int) -> dict:
    return {"prompt": "{} plays for", "relation_id": "P54", "subject": f"Player {case_id}",
            "target_new": {"str": "Paris", "id": "Q90"}, "target_true": {"str": "Rome", "id": "Q220"}}


def _eval(rng: random.Random, *, memit: bool, generation: bool) -> dict:
    """One ``pre``/``post`` block as their compute_rewrite_quality_counterfact returns it."""
    out: dict = {"rewrite_prompts_probs": _probs(rng, 1), "paraphrase_prompts_probs": _probs(rng, 2),
                 "neighborhood_prompts_probs": _probs(rng, 3)}
    if memit:  # MEMIT also records strict top-1 per prompt
        out.update({f"{g}_prompts_correct": [rng.random() < 0.5 for _ in range(n)]
                    for g, n in (("rewrite", 1), ("paraphrase", 2), ("neighborhood", 3))})
    else:  # ROME also scores attribute prompts
        out["attribute_prompts_probs"] = _probs(rng, 2)
    if generation:
        out.update({"ngram_entropy": rng.uniform(5.0, 6.5), "reference_score": rng.random(),
                    "text": ["Player plays for Paris.", "The team of Player is"]})
        if not memit:
            out.update({"essence_score": rng.uniform(10, 40), "essence_text": ["Player is a footballer."]})
    return out


def write_rome_run(run_dir: Path, case_ids: list[int], *, seed: int = 0, hparams: dict | None = ROME_HPARAMS) -> None:
    """A run folder as ROME's evaluate.py writes it: params.json, then case_<id>.json with pre and post."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    if hparams is not None:
        (run_dir / "params.json").write_text(json.dumps(hparams, indent=4))
    for cid in case_ids:
        case = {"case_id": cid, "requested_rewrite": _requested_rewrite(cid), "time": rng.uniform(1, 3),
                "post": _eval(rng, memit=False, generation=True)}
        case["pre"] = _eval(rng, memit=False, generation=True)
        (run_dir / f"case_{cid}.json").write_text(json.dumps(case, indent=1))


def write_memit_run(run_dir: Path, case_ids: list[int], num_edits: int, *, seed: int = 0, interval: int = 2) -> None:
    """A run folder as MEMIT's evaluate.py writes it: params.json, then per chunk of ``num_edits``
    records one ``<num_edits>_edits-case_<id>.json`` each (the last chunk may be shorter; its files
    keep the name), post only, generation every ``interval`` case ids."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "params.json").write_text(json.dumps(MEMIT_HPARAMS, indent=4))
    for start in range(0, len(case_ids), num_edits):
        chunk = case_ids[start:start + num_edits]
        t = rng.uniform(1, 3)
        for cid in chunk:
            case = {"case_id": cid, "grouped_case_ids": chunk, "num_edits": num_edits,
                    "requested_rewrite": _requested_rewrite(cid), "time": t,
                    "post": _eval(rng, memit=True, generation=cid % interval == 0)}
            (run_dir / f"{num_edits}_edits-case_{cid}.json").write_text(json.dumps(case, indent=1))


def assert_same_as_theirs(row: dict, run_dir: Path, pattern: str, *, top1: bool) -> None:
    theirs = rome_summarize(run_dir, pattern)
    assert row["n"] == theirs["num_cases"]
    for col, key in COLUMNS + (TOP1 if top1 else ()):
        assert row["metrics"][col]["mean"] == pytest.approx(100 * theirs[key][0], rel=1e-12), col
    assert row["metrics"]["S"]["mean"] == pytest.approx(100 * theirs["post_score"], rel=1e-12)


def test_rome_run_folder_with_its_params_json(tmp_path, capsys):
    run = tmp_path / "ROME" / "run_000"
    write_rome_run(run, [0, 2, 10, 11])
    assert kind_of(run) == "rome"
    row = summarize_any(run)
    assert_same_as_theirs(row, run, "case_*.json", top1=False)
    assert 0 < row["metrics"]["ES"]["mean"] < 100 and 0 < row["metrics"]["NS"]["mean"] < 100  # not a degenerate check
    assert row["case_ids"] == [0, 2, 10, 11]
    assert row["label"] == "ROME-format folder (ROME/run_000 L5, N=4)"
    assert row["protocol"]["format"] == "rome" and row["protocol"]["hparams"] == ROME_HPARAMS
    # the reproduction: the CLI reads it (it used to say "lacks 'metrics'", exit 2)
    assert main(["summarize", str(run), "--no-plot", "--out", str(tmp_path / "sum")]) == 0
    rows = json.loads((tmp_path / "sum" / "summary.json").read_text())["rows"]
    assert rows[0]["metrics"]["ES"]["mean"] == pytest.approx(row["metrics"]["ES"]["mean"])


def test_memit_run_folder_with_its_params_json(tmp_path):
    run = tmp_path / "MEMIT" / "run_000"
    write_memit_run(run, [0, 1, 2, 3, 4], num_edits=2)
    assert sorted(p.name for p in run.iterdir())[:2] == ["2_edits-case_0.json", "2_edits-case_1.json"]
    assert kind_of(run) == "memit"
    row = summarize_any(run)
    assert_same_as_theirs(row, run, "*case_*.json", top1=True)
    assert row["metrics"]["ngram_entropy"]["n"] == 3  # generation on case ids 0, 2, 4 only
    assert row["label"] == "MEMIT-format folder (MEMIT/run_000 L3,4,5,6 λ 15000, 2 edits per batch, N=5)"
    assert row["protocol"]["num_edits"] == [2] and row["protocol"]["hparams"] == MEMIT_HPARAMS
    assert summarize_any(run, limit=2)["case_ids"] == [0, 1]


def test_a_folder_of_run_folders(tmp_path):
    write_rome_run(tmp_path / "ROME" / "run_000", [0, 1, 2], seed=1)
    write_rome_run(tmp_path / "ROME" / "run_001", [0, 1, 2, 3], seed=2, hparams={**ROME_HPARAMS, "layers": [7]})
    write_memit_run(tmp_path / "MEMIT" / "run_000", [0, 1, 2, 3], num_edits=4, seed=3)
    assert main(["summarize", str(tmp_path / "ROME"), str(tmp_path / "MEMIT"), "--no-plot",
                 "--out", str(tmp_path / "sum")]) == 0
    rows = json.loads((tmp_path / "sum" / "summary.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [
        "ROME-format folder (ROME/run_000 L5, N=3)",
        "ROME-format folder (ROME/run_001 L7, N=4)",
        "MEMIT-format folder (MEMIT/run_000 L3,4,5,6 λ 15000, 4 edits per batch, N=4)",
    ]
    for r, pattern in zip(rows, ("case_*.json", "case_*.json", "*case_*.json")):
        theirs = rome_summarize(Path(r["run_dir"]), pattern)
        for col, key in COLUMNS:
            assert r["metrics"][col]["mean"] == pytest.approx(100 * theirs[key][0], rel=1e-12), (r["run_dir"], col)
    # --common: the records all three runs have
    assert main(["summarize", str(tmp_path / "ROME"), str(tmp_path / "MEMIT"), "--no-plot", "--common",
                 "--out", str(tmp_path / "sum2")]) == 0
    rows = json.loads((tmp_path / "sum2" / "summary.json").read_text())["rows"]
    assert [r["case_ids"] for r in rows] == [[0, 1, 2]] * 3


PAIRS = [("Paris", "Rome"), ("Oslo", "Lima"), ("Kyiv", "Bern"), ("Doha", "Riga")]


@pytest.fixture(scope="module")
def source_run(byte_tok, tmp_path_factory):
    """Our bench run: batches of 2 (MEMIT's grouped_case_ids), ES/PS/NS strictly between 0 and 100."""
    tmp = tmp_path_factory.mktemp("src")
    recs = []
    for i, (subject, (new, true)) in enumerate(zip(["Messi", "Kaka", "Pele", "Xavi"], PAIRS)):
        r = rome_record(i, subject)
        r["requested_rewrite"]["target_new"]["str"], r["requested_rewrite"]["target_true"]["str"] = new, true
        recs.append(r)
    path = tmp / "cf.json"
    path.write_text(json.dumps(recs))
    hp = se.ShiftHyperParams(layers=[1], eta=20.0, target_tokens="all", skip_if_predicted=False, max_relative_norm=None)
    cfg = BenchConfig(alg="SHIFT", hparams=hp, gen_max_length=16, gen_every=2, neighborhood_kl=False, num_edits=2)
    return run_bench(tiny_model("llama"), byte_tok, bdata.load_counterfact(path), cfg, tmp / "results",
                     data_info={"path": str(path), "sha256": bdata.file_sha256(path)}, model_name="tiny-llama",
                     progress=False)


@pytest.mark.parametrize("fmt", ["rome", "memit"])
def test_export_then_summarize_gives_our_numbers(source_run, tmp_path, fmt):
    ours = summarize_run(source_run)
    for col in ("ES", "PS", "NS"):
        assert 0 < ours["metrics"][col]["mean"] < 100, col
    out = tmp_path / fmt.upper() / "run_000"
    assert main(["export", str(source_run), "--format", fmt, "--out", str(out)]) == 0
    # their run folder's shape: the hparams file as params.json beside the case files
    assert json.loads((out / "params.json").read_text()) == ours["protocol"]["hparams"]
    names = sorted(p.name for p in out.iterdir() if p.name != "params.json")
    assert names == (
        [f"case_{i}.json" for i in range(4)] if fmt == "rome" else [f"2_edits-case_{i}.json" for i in range(4)]
    )
    assert json.loads((out / names[3]).read_text())["post"].keys() >= {
        "rewrite_prompts_probs",
        "neighborhood_prompts_probs",
    }
    assert kind_of(out) == fmt and kind_of(source_run) == "ours"  # both have a params.json: told apart by content
    row = summarize_any(out)
    cols = ["ES", "PS", "NS", "EM", "PM", "NM", "S", "ngram_entropy"] + (
        ["efficacy_top1", "paraphrase_top1", "neighborhood_top1"] if fmt == "memit" else [])
    for col in cols:
        assert row["metrics"][col]["mean"] == pytest.approx(ours["metrics"][col]["mean"], abs=1e-9), col
    assert row["label"] == (f"{fmt.upper()}-format folder ({fmt.upper()}/run_000: SHIFT L1 eta 20"
                            + (", 2 edits per batch" if fmt == "memit" else "") + ", N=4)")
    assert_same_as_theirs(row, out, "case_*.json" if fmt == "rome" else "*case_*.json", top1=fmt == "memit")
    # the CLI, both folders side by side
    assert main(["summarize", str(out), str(source_run), "--no-plot", "--common", "--out", str(tmp_path / "sum")]) == 0
    rows = json.loads((tmp_path / "sum" / "summary.json").read_text())["rows"]
    assert [r["metrics"]["S"]["mean"] for r in rows] == pytest.approx([ours["metrics"]["S"]["mean"]] * 2)


def _ours_params_in_rome_folder(tmp: Path, src: Path) -> tuple[Path, list[str]]:
    d = tmp / "x"
    write_rome_run(d, [0, 1], hparams=None)
    shutil.copy(src / "params.json", d / "params.json")
    return d, ["a shift_edit run folder (params.json records our protocol: alg SHIFT, model tiny-llama)",
               "a ROME run folder (case_0.json holds case_id and post)"]


def _rome_and_memit_cases(tmp: Path, src: Path) -> tuple[Path, list[str]]:
    d = tmp / "x"
    write_rome_run(d, [0, 1])
    write_memit_run(tmp / "m", [2, 3], num_edits=1)
    for f in (tmp / "m").glob("*case_*.json"):
        shutil.copy(f, d / f.name)
    return d, ["a ROME run folder (case_0.json holds case_id and post)",
               "a MEMIT run folder (1_edits-case_2.json holds case_id and post)"]


def _our_cases_their_params(tmp: Path, src: Path) -> tuple[Path, list[str]]:
    d = tmp / "x"
    shutil.copytree(src, d)
    (d / "params.json").write_text(json.dumps(ROME_HPARAMS))
    return d, ["a shift_edit run folder (case_0.json holds request and metrics)",
               "a ROME/MEMIT run folder (params.json holds their hparams: layers, fact_token, v_num_grad_steps, v_lr, "
               "...)"]


@pytest.mark.parametrize("make", [_ours_params_in_rome_folder, _rome_and_memit_cases, _our_cases_their_params])
def test_a_folder_that_reads_two_ways_is_one_line_naming_both(source_run, tmp_path, capsys, make):
    d, readings = make(tmp_path, source_run)
    assert main(["summarize", str(d), "--no-plot", "--out", str(tmp_path / "sum")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "ambiguous run folder" in err and all(r in err for r in readings), err
    assert not (tmp_path / "sum").exists()  # nothing written


@pytest.mark.parametrize("make", ["rome_case_among_ours", "our_case_among_rome", "hparams_only", "params_list",
                                  "damaged_match", "memit_name_our_layout"])
def test_other_mixed_or_partial_folders_are_one_line_exit_2(source_run, tmp_path, capsys, make):
    d = tmp_path / "x"
    want = {"rome_case_among_ours": "case_9.json: a ROME/MEMIT case file (case_id, post) in a shift_edit run folder",
            "our_case_among_rome": "case_9.json: a shift_edit case file (request, metrics) in a ROME run folder",
            "hparams_only": "a ROME/MEMIT run folder (params.json holds their hparams: layers, fact_token, "
                            "v_num_grad_steps, v_lr, ...) without case files yet",
            "params_list": "params.json: neither our run parameters nor a ROME/MEMIT hparams object (a JSON list",
            "damaged_match": "params.json: a 'match' without alg, model and protocol",
            "memit_name_our_layout": "1_edits-case_0.json: neither a shift_edit case file"}[make]
    if make == "rome_case_among_ours":  # the first file decides the reading, every file is checked
        shutil.copytree(source_run, d)
        write_rome_run(tmp_path / "r", [9], hparams=None)
        shutil.copy(tmp_path / "r" / "case_9.json", d)
    elif make == "our_case_among_rome":
        write_rome_run(d, [0, 1])
        shutil.copy(source_run / "case_0.json", d / "case_9.json")
    elif make == "hparams_only":
        d.mkdir()
        (d / "params.json").write_text(json.dumps(ROME_HPARAMS))
    elif make == "params_list":
        write_rome_run(d, [0], hparams=None)
        (d / "params.json").write_text("[1, 2]")
    elif make == "damaged_match":
        write_rome_run(d, [0], hparams={"match": {"alg": "SHIFT"}})
    elif make == "memit_name_our_layout":
        d.mkdir()
        shutil.copy(source_run / "case_0.json", d / "1_edits-case_0.json")
    assert main(["summarize", str(d), "--no-plot", "--out", str(tmp_path / "sum")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert want in err, err
