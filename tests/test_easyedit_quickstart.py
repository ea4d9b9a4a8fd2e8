"""EasyEdit's README quick-start, as an EasyEdit user writes it, run with only the import line changed,
for SHIFT, ROME, MEMIT and FT on SmolLM2; ROME's notebook cell likewise. The hparams of ROME, MEMIT
and FT are EasyEdit-format YAML files (their field names), kept cheap for a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

EASYEDIT_YAML = {
    "ROME": """alg_name: "ROME"
model_name: "smollm2-135m"
stats_dir: "./data/stats"
device: 0
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 3
v_lr: 5e-1
v_loss_layer: 29
v_weight_decay: 0.5
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 2]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "model.embed_tokens"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: false
""",
    "MEMIT": """alg_name: "MEMIT"
model_name: "smollm2-135m"
stats_dir: "./data/stats"
device: 0
layers: [4, 5]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 3
v_lr: 5e-1
v_loss_layer: 29
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: false
mom2_update_weight: 1500
context_template_length_params: [[5, 2]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "model.embed_tokens"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
""",
    "FT": """alg_name: "FT"
model_name: "smollm2-135m"
device: 0
layers: [22]
num_steps: 4
batch_size: 3
max_length: 40
lr: 5e-4
weight_decay: 0
kl_factor: 0
norm_constraint: false
objective_optimization: "target_new"
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "model.embed_tokens"
model_parallel: false
""",
}

#: EasyEdit's README quick-start (Steps 2-6) with portability, as its users write it
QUICKSTART = """
from easyeditor import BaseEditor, {ALG}HyperParams

hparams = {ALG}HyperParams.from_hparams('{HPARAMS}')
prompts = ['Ray Charles, the', 'Grant Hill is a professional']
ground_truth = ['piano', 'basketball']
target_new = ['violin', 'soccer']
subject = ['Ray Charles', 'Grant Hill']
rephrase_prompts = ['The musician Ray Charles, the', 'Grant Hill plays as a professional']
locality_inputs = {{
    'neighborhood': {{
        'prompt': ['Joseph Fischhof, the', 'Larry Bird is a professional'],
        'ground_truth': ['piano', 'basketball']
    }},
}}
portability_inputs = {{
    'synonym': {{
        'prompt': ['Ray Charles, the famous', 'Grant Hill is a famous professional'],
        'ground_truth': ['violin', 'soccer']
    }},
}}
editor = BaseEditor.from_hparams(hparams)
metrics, edited_model, _ = editor.edit(
    prompts=prompts,
    ground_truth=ground_truth,
    target_new=target_new,
    subject=subject,
    rephrase_prompts=rephrase_prompts,
    locality_inputs=locality_inputs,
    portability_inputs=portability_inputs,
    keep_original_weight=True,
    sequential_edit={SEQ}
)
"""


def _hparams_path(alg: str, tmp_path: Path) -> str:
    if alg == "SHIFT":
        return str(REPO / "hparams" / "SHIFT" / "smollm2-135m")  # ours: EasyEdit has no SHIFT
    p = tmp_path / "hparams" / alg / "smollm2-135m.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(EASYEDIT_YAML[alg])
    return str(p)[: -len(".yaml")]


@pytest.mark.parametrize("alg", ["SHIFT", "ROME", "MEMIT", "FT"])
def test_easyedit_quickstart_runs_with_only_the_import_changed(alg, smollm2, tmp_path, monkeypatch):
    from test_easyedit import easyedit_structure, keys_of

    import shift_edit.model.loading

    model, tok = smollm2
    monkeypatch.setattr(shift_edit.model.loading, "load_model", lambda name, **kw: (model, tok))  # the session's copy
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seq in (False, True):
        script = QUICKSTART.format(ALG=alg.title() if alg == "SHIFT" else alg, HPARAMS=_hparams_path(alg, tmp_path),
                                   SEQ=seq)
        ported = script.replace("from easyeditor import", "from shift_edit import")  # the one line that changes
        assert sum(a != b for a, b in zip(script.splitlines(), ported.splitlines())) == 1
        scope: dict = {}
        exec(compile(ported, "quickstart.py", "exec"), scope)
        metrics, edited = scope["metrics"], scope["edited_model"]
        assert edited is model and len(metrics) == 2
        for m in metrics:
            want = easyedit_structure(m["requested_rewrite"], False)
            assert keys_of({k: v for k, v in m.items() if k not in ("time", "shift_edit")}) == keys_of(want)
        json.dumps(metrics)  # a results JSON file can hold them
        changed = any(not torch.equal(p, state[n]) for n, p in model.named_parameters())
        assert changed == seq, "sequential_edit=False restores the model, True keeps the edits"
        scope["editor"].undo_all()
        for n, p in model.named_parameters():
            assert torch.equal(p, state[n]), n
    if alg == "SHIFT":  # shipped hparams: the edits take (the others run with too few steps to say)
        pre = sum(m["pre"]["rewrite_acc"][0] for m in metrics)
        post = sum(m["post"]["rewrite_acc"][0] for m in metrics)
        assert post > pre


def test_rome_notebook_cell_with_only_the_import_changed(smollm2, tmp_path):
    """ROME's notebook (notebooks/rome.ipynb): requests, hparams from the JSON file, apply_rome_to_model,
    and the restore loop over orig_weights (ROME uses its util.nethook.get_parameter; a dict lookup here)."""
    model, tok = smollm2
    hp_file = tmp_path / "ROME" / "smollm2-135m.json"
    hp_file.parent.mkdir()
    hp_file.write_text(json.dumps({"layers": [5], "fact_token": "subject_last", "v_num_grad_steps": 8, "v_lr": 5e-1,
                                   "v_loss_layer": 29, "v_weight_decay": 0.5, "clamp_norm_factor": 4,
                                   "kl_factor": 0.0625,
                                   "mom2_adjustment": False, "context_template_length_params": [[5, 2]],
                                   "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "mom2_dataset": "wikipedia",
                                   "mom2_n_samples": 100000, "mom2_dtype": "float32"}))
    cell = f"""
from rome import ROMEHyperParams, apply_rome_to_model
request = [{{"prompt": "{{}} was the founder of", "subject": "Steve Jobs", "target_new": {{"str": "Microsoft"}}}}]
hparams = ROMEHyperParams.from_json({str(hp_file)!r})
model_new, orig_weights = apply_rome_to_model(model, tok, request, hparams, return_orig_weights=True)
with torch.no_grad():
    for k, v in orig_weights.items():
        dict(model.named_parameters())[k][...] = v
"""
    ported = cell.replace("from rome import", "from shift_edit import")
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    scope = {"model": model, "tok": tok, "torch": torch}
    exec(compile(ported, "rome_cell.py", "exec"), scope)
    assert scope["model_new"] is model and len(scope["orig_weights"]) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), n
