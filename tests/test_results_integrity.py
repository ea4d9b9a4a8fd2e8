"""Results never collide and are never half-written (issue 30, group B): case ids that would share
a result file, ids that cannot name a file, huge ``--case-ids`` ranges, a damaged sequential state,
stale hidden folders of a killed ``edit --save``, and the patch of an edit that changed nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from _tiny import tiny_model

import shift_edit as se
from shift_edit.bench import counterfact as bdata
from shift_edit.cli import main


def rome_record(case_id, i: int = 0) -> dict:
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": "{} plays for",
            "subject": f"Sub{i}",
            "relation_id": "P54",
            "target_new": {"str": "Paris", "id": "Q1"},
            "target_true": {"str": "Rome", "id": "Q2"},
        },
        "paraphrase_prompts": [f"Yes. Sub{i} plays for"],
        "neighborhood_prompts": ["Totti plays for"],
        "generation_prompts": [f"Sub{i} is"],
    }


def write_data(tmp_path: Path, ids, name: str = "data.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps([rome_record(c, i) for i, c in enumerate(ids)]))
    return p


@pytest.fixture
def tiny_dir(tmp_path, byte_tok) -> Path:
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    return folder


@pytest.fixture
def shift_yaml(tmp_path) -> Path:
    hp = tmp_path / "hp.yaml"
    hp.write_text("alg_name: SHIFT\nlayers: [1]\neta: 2.0\nskip_if_predicted: false\nmax_relative_norm: null\n")
    return hp


def one_line_exit_2(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("ids, message", [
    ([7, "7", 8], "case ids 7 and '7': both would write the result file case_7.json"),
    (["a/b", "a_b"], "case ids 'a/b' and 'a_b'"),
    ([3, 3], "duplicate case_id 3"),
    (["x" * 300], "case_id is 300 characters long"),
    (["a\x00b"], "control character '\\x00'"),
    (["  "], "case_id is empty"),
])
def test_case_ids_that_would_collide_or_cannot_name_a_file(ids, message, tmp_path, tiny_dir, shift_yaml, capsys):
    data = write_data(tmp_path, ids)
    out = tmp_path / "out"
    code = main(["bench", "--alg", "SHIFT", "--model", str(tiny_dir), "--hparams", str(shift_yaml), "--data", str(data),
                 "--out", str(out), "--skip-generation", "--no-progress"])
    assert message in one_line_exit_2(capsys, code)
    assert not out.exists(), "a refused data file left a run folder behind"


def test_case_id_range_is_checked_before_it_is_expanded():
    with pytest.raises(se.ShiftEditError, match=r"selects 1,000,000,000,000 ids, more than the 1,000,000"):
        bdata.parse_case_ids("0-999999999999")
    with pytest.raises(se.ShiftEditError, match="bad range"):
        bdata.parse_case_ids("0-" + "9" * 5000)  # beyond int()'s digit limit: still one line
    assert bdata.parse_case_ids("3-5,x") == ["3", "4", "5", "x"]


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", [
    lambda t: t[: len(t) // 2],                                   # truncated
    lambda t: "{}",                                               # not the state this version writes
    lambda t: t.replace('"n_edits": 2', '"n_edits": "two"'),      # a field of the wrong type
    lambda t: t.replace('"tag": "', '"tag": "../'),              # a tag that is not a file name
])
def test_damaged_sequential_state_is_one_line_and_nothing_is_overwritten(damage, tmp_path, tiny_dir, capsys):
    data = write_data(tmp_path, range(4))
    hp = tmp_path / "ft.yaml"
    hp.write_text("alg_name: FT\nlayers: [1]\nsteps: 2\nlr: 0.01\nskip_if_predicted: false\nmax_relative_norm: null\n")
    args = ["bench", "--alg", "FT", "--model", str(tiny_dir), "--hparams", str(hp), "--data", str(data),
            "--out", str(tmp_path / "out"), "--sequential", "4", "--eval-at", "2", "--save-every", "1", "--ppl-lines",
            "0",
            "--no-progress"]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "out" / "FT").glob("seq_*")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["finished"] = False  # as if killed after the state of 2 edits was saved
    (run_dir / "summary.json").write_text(json.dumps(summary))
    state = run_dir / "state" / "state.json"
    saved = json.loads(state.read_text())
    saved["state"].update(n_edits=2, n_batches=2, batches=saved["state"]["batches"][:2])
    state.write_text(damage(json.dumps(saved)))
    before = _files(run_dir)
    capsys.readouterr()
    err = one_line_exit_2(capsys, main(args))
    assert "the saved state of this sequential run is damaged" in err and f"delete {run_dir}" in err
    assert _files(run_dir) == before, "a damaged state was overwritten"


def test_killed_save_leaves_no_hidden_folder_after_a_rerun(tmp_path):
    """``edit --save DIR`` killed (SIGKILL) while writing leaves ``.DIR.<pid>.*.tmp``; the next
    write of DIR removes the folders of processes that are gone (never a live one's)."""
    from shift_edit.files.io import atomic_dir, atomic_file

    dest = tmp_path / "saved"
    dead = tmp_path / f".saved.{2**22 + 12345}.abcd.tmp"  # above pid_max: no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".saved.{os.getpid()}.efgh.tmp"
    live.mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "saved"])
    stale_file = tmp_path / f".p.safetensors.{2**22 + 1}.xyz.tmp"
    stale_file.write_bytes(b"half")
    with atomic_file(tmp_path / "p.safetensors") as tmp:
        tmp.write_bytes(b"ok")
    assert not stale_file.exists() and (tmp_path / "p.safetensors").read_bytes() == b"ok"


def test_skipped_edit_writes_no_patch_and_says_so(byte_tok, tmp_path, capsys):
    """An edit whose request was skipped (target already top-1) changed nothing: ``edit
    --save-patch`` writes no patch and says so (exit 0); ``EditResult.save_patch`` refuses in one line."""
    from test_algorithm_matrix import SKIP_REQ, predicting_model

    model = predicting_model("llama", byte_tok)
    folder = tmp_path / "predicting"
    model.save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    res = se.edit(model, byte_tok, SKIP_REQ, se.ShiftHyperParams(layers=[1], eta=1.0, skip_if_predicted=True))
    assert res.skipped == [True] and not res.deltas
    with pytest.raises(se.ShiftEditError, match="changed no weight .* no patch to write"):
        res.save_patch(tmp_path / "lib.safetensors")
    assert not (tmp_path / "lib.safetensors").exists()
    hp = tmp_path / "hp.yaml"
    hp.write_text("alg_name: SHIFT\nlayers: [1]\neta: 1.0\n")
    patch, lora = tmp_path / "p.safetensors", tmp_path / "lora"
    code = main(["edit", "--model", str(folder), "--hparams", str(hp), "--prompt",
                 SKIP_REQ["prompt"].format(SKIP_REQ["subject"]),
                 "--target", SKIP_REQ["target_new"], "--save-patch", str(patch), "--save-lora", str(lora)])
    out = capsys.readouterr().out
    assert code == 0 and "no patch written: the edit changed nothing" in out
    assert not patch.exists() and not lora.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
