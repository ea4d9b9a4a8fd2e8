"""ROME/MEMIT JSON and EasyEdit YAML hparams files load through the mapping table.

Fixtures are written here with the field names and values of kmeng01/rome ``hparams/ROME/gpt2-xl.json``,
``hparams/FT/gpt2-xl_unconstr.json``, kmeng01/memit ``hparams/MEMIT/gpt2-xl.json`` and zjunlp/EasyEdit
``hparams/ROME/gpt2-xl.yaml``, ``hparams/MEMIT/gpt2-xl.yaml``, ``hparams/FT/gpt2-xl.yaml``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import shift_edit as se
from shift_edit.core.foreign_hparams import FIELD_MAP, mapping_table_markdown
from shift_edit.model.corpus import default_corpus

GPT2_MODULES = {
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte",
}
ROME_JSON = {"layers": [17], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 5e-1, "v_loss_layer": 47,
             "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": True,
             "context_template_length_params": [[5, 10], [10, 10]], **GPT2_MODULES,
             "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32"}
MEMIT_JSON = {"layers": [13, 14, 15, 16, 17], "clamp_norm_factor": 0.75, "layer_selection": "all",
              "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 5e-1, "v_loss_layer": 47,
              "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 20000,
              **GPT2_MODULES, "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32"}
FT_UNCONSTR_JSON = {"layers": [1], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0,
                    "norm_constraint": False, **GPT2_MODULES}

# EasyEdit's YAML files as they are written (v_lr: 5e-1 without a dot is a YAML *string*)
EASYEDIT_ROME_YAML = """alg_name: "ROME"
model_name: "./hugging_cache/gpt2-xl"
stats_dir: "./data/stats"
device: 0
layers: [17]
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 47
v_weight_decay: 0.5
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: false
"""
EASYEDIT_MEMIT_YAML = """alg_name: "MEMIT"
model_name: "./hugging_cache/gpt2-xl"
stats_dir: "./data/stats"
device: 0
layers: [13, 14, 15, 16, 17]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 47
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 20000
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
"""
EASYEDIT_FT_YAML = """alg_name: "FT"
model_name: "./hugging_cache/gpt2-xl"
device: 4

layers: [0]
num_steps: 25
batch_size: 3
max_length: 40
lr: 5e-4
weight_decay: 0
kl_factor: 0
norm_constraint: 5e-4
objective_optimization: "prompt_last"
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
model_parallel: false
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_rome_json_loads_with_each_field_mapped(tmp_path, caplog):
    p = write(tmp_path, "hparams/ROME/gpt2-xl.json", json.dumps(ROME_JSON, indent=4))
    with caplog.at_level(logging.WARNING):
        hp = se.ROMEHyperParams.from_json(p)
    assert isinstance(hp, se.ROMEHyperParams) and hp.alg_name == "ROME"  # EasyEdit scripts read hparams.alg_name
    assert hp.layers == [17] and hp.v_lr == 0.5 and hp.clamp_norm_factor == 4.0 and hp.kl_factor == 0.0625
    assert hp.ff2_template == "transformer.h.{}.mlp.c_proj" and hp.mom2_adjustment and hp.mom2_corpus is None
    assert hp.context_template_length_params == [[5, 10], [10, 10]] and hp.skip_if_predicted is False
    assert hp.mom2_n_tokens == 100_000
    warned = " ".join(r.getMessage() for r in caplog.records)
    for field in ("v_loss_layer", "layer_module_tmp", "lm_head_module", "mom2_n_samples"):
        assert field in warned
    assert all(len(r.getMessage().splitlines()) == 1 for r in caplog.records)


def test_mom2_dataset_is_one_warning_naming_the_corpus_used(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        se.MEMITHyperParams.from_json(write(tmp_path, "m.json", json.dumps(MEMIT_JSON)))
    said = [r.getMessage() for r in caplog.records if "mom2_dataset=" in r.getMessage()]
    assert len(said) == 1 and "'wikipedia'" in said[0] and "instead" in said[0]
    assert default_corpus() in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # mom2_adjustment: false reads no statistics: nothing to say
        se.ROMEHyperParams.from_hparams(write(tmp_path, "r.yaml", EASYEDIT_ROME_YAML))
    assert not any("mom2_dataset=" in r.getMessage() for r in caplog.records)


def test_memit_repo_ft_wd_file_loads(tmp_path, caplog):
    """kmeng01/memit ``hparams/FT/EleutherAI_gpt-j-6B_wd.json``: ``weight_decay: false`` and ``wd_power_law`` (a
    list, which MEMIT's FT ignores: it reads the power law only from a tuple)."""
    wd = {**FT_UNCONSTR_JSON, "layers": [21], "weight_decay": False, "wd_power_law": [-0.87028798, 0.15589562],
          "rewrite_module_tmp": "transformer.h.{}"}
    with caplog.at_level(logging.WARNING):
        ft = se.FTHyperParams.from_json(write(tmp_path, "ft_wd.json", json.dumps(wd)))
    assert type(ft) is se.FTHyperParams and ft.weight_decay == 0.0 and ft.steps == 25
    assert sum("wd_power_law" in r.getMessage() for r in caplog.records) == 1


def test_memit_json_and_ft_json(tmp_path):
    hp = se.MEMITHyperParams.from_json(write(tmp_path, "m.json", json.dumps(MEMIT_JSON)))
    assert hp.layers == [13, 14, 15, 16, 17] and hp.mom2_update_weight == 20000.0 and hp.clamp_norm_factor == 0.75
    ft = se.FTHyperParams.from_json(write(tmp_path, "ft.json", json.dumps(FT_UNCONSTR_JSON)))
    assert type(ft) is se.FTHyperParams and ft.steps == 25 and ft.lr == 5e-4
    constr = se.FTHyperParams.from_json(
        write(tmp_path, "ftc.json", json.dumps({**FT_UNCONSTR_JSON, "norm_constraint": 5e-4}))
    )
    assert type(constr) is se.FTLHyperParams and constr.norm_constraint == 5e-4  # ROME's constrained FT is FT-L


def test_easyedit_yaml_loads_with_from_hparams_and_load_hparams(tmp_path):
    rome = write(tmp_path, "hparams/ROME/gpt2-xl.yaml", EASYEDIT_ROME_YAML)
    hp = se.ROMEHyperParams.from_hparams(str(rome)[:-5])  # EasyEdit style: no .yaml
    assert hp.v_lr == 0.5 and hp.mom2_adjustment is False and hp.model_name == "./hugging_cache/gpt2-xl"
    assert se.load_hparams(rome) == hp
    memit = se.MEMITHyperParams.from_hparams(write(tmp_path, "memit.yaml", EASYEDIT_MEMIT_YAML))
    assert memit.v_lr == 0.5 and memit.mom2_update_weight == 20000.0
    ft = se.FTHyperParams.from_hparams(write(tmp_path, "ft.yaml", EASYEDIT_FT_YAML))
    assert type(ft) is se.FTLHyperParams and ft.norm_constraint == 5e-4 and ft.lr == 5e-4
    assert ft.target_tokens == "first" and ft.batch_size == 3
    m = se.FTHyperParams.from_hparams(write(tmp_path, "ftm.yaml", EASYEDIT_FT_YAML.replace(
        '"prompt_last"', '"target_new"').replace("norm_constraint: 5e-4", "norm_constraint: false")))
    assert type(m) is se.FTHyperParams and m.target_tokens == "all"
    # the class asked for must fit
    with pytest.raises(se.ShiftEditError, match="MEMIT hparams, not ROME"):
        se.ROMEHyperParams.from_hparams(write(tmp_path, "m2.yaml", EASYEDIT_MEMIT_YAML))


@pytest.mark.parametrize("change, match", [
    (('layer_selection: "all"', 'layer_selection: "random"'), "layer_selection"),
    (("model_parallel: false", "model_parallel: false\nsome_new_field: 3"), "some_new_field"),
    (("v_lr: 5e-1", "v_lr: fast"), "v_lr"),
])
def test_fields_that_cannot_be_honoured_are_errors_naming_them(tmp_path, change, match):
    text = (EASYEDIT_ROME_YAML if "fp16" in change[0] else EASYEDIT_MEMIT_YAML).replace(*change)
    cls = se.ROMEHyperParams if "fp16" in change[0] else se.MEMITHyperParams
    with pytest.raises(se.ShiftEditError, match=match):
        cls.from_hparams(write(tmp_path, "x.yaml", text))


def test_ft_with_kl_factor_is_an_error(tmp_path):
    with pytest.raises(se.ShiftEditError, match="kl_factor"):
        se.FTHyperParams.from_json(write(tmp_path, "ft.json", json.dumps({**FT_UNCONSTR_JSON, "kl_factor": 0.5})))


def test_numeric_strings_are_numbers_in_our_files_too(tmp_path):
    p = write(tmp_path, "s.yaml", "alg_name: SHIFT\nlayers: [1]\neta: 5e-1\n")
    assert se.ShiftHyperParams.from_hparams(p).eta == 0.5


def test_mapping_table_is_in_the_porting_guide():
    page = (Path(__file__).resolve().parents[1] / "docs" / "porting.md").read_text()
    assert mapping_table_markdown() in page
    assert all(f"`{k}`" in page for k in FIELD_MAP)
