"""The shift-edit CLI: the main job end to end, and one clear line + exit 2 for bad input."""

import subprocess
import sys

import pytest

from shift_edit.cli import main

EIFFEL = ["--model", "smollm2-135m", "--prompt", "The Eiffel Tower is located in the city of", "--target", " Rome"]


def test_edit_makes_rome_top1_and_saves(smollm2, tmp_path, capsys):
    patch = tmp_path / "rome.safetensors"
    assert main(["edit", *EIFFEL, "--save-patch", str(patch)]) == 0
    out = capsys.readouterr().out
    assert "before: ' Paris' " in out, "the unedited top-1 is printed first"
    assert "after:  ' Rome' " in out, "the edited top-1"
    assert patch.is_file() and patch.stat().st_size < 100_000
    assert main(["apply-patch", str(patch), "--model", "smollm2-135m"]) == 0
    assert "after:  ' Rome'" in capsys.readouterr().out


def test_models_lists_registry_and_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gpt2" in out and "gptj" in out and "SHIFT" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--model", "smollm2-135m", "--prompt", "x"], "required: --target"),
        (["edit", *EIFFEL[:-1], "  "], "target_new for prompt"),
        (["edit", "--model", "smollm2-135m", "--prompt", "{} plays", "--target", "x"], "has '{}' but no subject"),
        (["edit", *EIFFEL, "--layer", "99"], "layer 99 is out of range"),
        (["edit", *EIFFEL, "--eta", "-1"], "eta: got -1.0"),
        (["edit", *EIFFEL, "--hparams", "nope.yaml"], "hparams file not found"),
        (["edit", "--model", "/no/such/model", "--prompt", "a", "--target", "b", "--layer", "1", "--eta", "1"],
         "cannot load model"),
        (["edit", "--model", "/no/such/model.gguf", "--prompt", "a", "--target", "b", "--layer", "1", "--eta", "1"],
         "GGUF file not found"),
        (["edit", "--model", "tiny-unknown", "--prompt", "a", "--target", "b"], "no shipped SHIFT hparams"),
        (["edit", *EIFFEL, "--dtype", "float8"], "unknown dtype"),
        (["apply-patch", "missing.safetensors", "--model", "smollm2-135m"], "patch file not found"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(argv, message, tmp_path, capsys, smollm2, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_file = tmp_path / "out" / "p.safetensors"
    extra = ["--save-patch", str(out_file)] if argv[0] == "edit" and "required" not in message else []
    with pytest.raises(SystemExit) as exc:
        sys.exit(main([*argv, *extra]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out_file.exists()


def test_existing_save_dir_is_refused_before_editing(tmp_path, capsys):
    target = tmp_path / "full"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["edit", *EIFFEL, "--save", str(target)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "shift_edit", "edit", "--model", "smollm2-135m"], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_eta_sets_each_algorithms_step_size():
    import argparse

    from shift_edit.cli.edit import resolve_hparams
    from shift_edit.core.errors import ShiftEditError

    def ns(alg, **kw):
        base = dict(alg=alg, model="no-such-model", hparams=None, layer=[1], eta=0.5, eta_scaling=None, no_skip=False)
        return argparse.Namespace(**{**base, **kw})

    assert resolve_hparams(ns("SHIFT")).eta == 0.5
    assert resolve_hparams(ns("SGD")).lr == 0.5
    assert resolve_hparams(ns("ADAM")).lr == 0.5
    with pytest.raises(ShiftEditError, match="--eta does not apply to ROME"):
        resolve_hparams(ns("ROME"))
    with pytest.raises(ShiftEditError, match="SHIFT option"):
        resolve_hparams(ns("SGD", eta_scaling="raw"))
