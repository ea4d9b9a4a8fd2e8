"""Never hand back a broken model (issue 17): one test per failure the audit found.

Checksummed patches and adapters, the edit guard (relative-norm bound, finite outputs,
``--force``), strict base fingerprints, one-line CLI errors found before the model is loaded,
case claims for concurrent bench runs, no partial run folder on early errors.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from _tiny import TINY_CONFIGS, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import shift_edit as se
from shift_edit.bench import counterfact as bdata
from shift_edit.bench.bench_config import BenchConfig
from shift_edit.bench.claims import claim_path, claimed, try_claim
from shift_edit.bench.runner import run_bench
from shift_edit.cli import main
from shift_edit.core.deltas import DEFAULT_MAX_RELATIVE_NORM
from shift_edit.core.errors import EditRefusedError
from shift_edit.files.patch import PatchChecksumError

REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": "Paris"}
OK = dict(layers=[1], eta=0.05, skip_if_predicted=False)  # well under the bound on the tiny models


def state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def same(model, snapshot):
    return all(torch.equal(p, snapshot[n]) for n, p in model.state_dict().items())


def one_line_exit_2(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def tiny_dir(tmp_path, byte_tok):
    """A tiny GPT-2 saved as a model folder (loads in well under a second)."""
    folder = tmp_path / "tiny"
    tiny_model("gpt2").save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    return folder


@pytest.fixture
def patch_file(tmp_path, byte_tok):
    return se.edit(tiny_model("gpt2"), byte_tok, REQ, se.ShiftHyperParams(**OK)).save_patch(tmp_path / "p.safetensors")


def flip_tensor_bytes(path, n=40, seed=0):
    """Overwrite ``n`` bytes of the tensor data (after the JSON header) with random bytes."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    g = torch.Generator().manual_seed(seed)
    for i in torch.randint(start, len(raw), (n,), generator=g).tolist():
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- 1. checksums

def test_corrupted_patch_is_refused_and_nothing_changes(patch_file, byte_tok):
    flip_tensor_bytes(patch_file)
    model = tiny_model("gpt2")
    before = state(model)
    with pytest.raises(PatchChecksumError, match=f"{patch_file}: checksum mismatch"):
        se.apply_patch(model, patch_file)
    assert same(model, before)


def test_corrupted_patch_on_the_cli_saves_nothing(patch_file, tiny_dir, tmp_path, capsys):
    flip_tensor_bytes(patch_file)
    out = tmp_path / "saved"
    err = one_line_exit_2(capsys, main(["apply-patch", str(patch_file), "--model", str(tiny_dir), "--save", str(out)]))
    assert "checksum mismatch" in err and not out.exists()


def test_changed_metadata_is_a_checksum_mismatch(patch_file):
    with safe_open(str(patch_file), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    doc = json.loads(meta["shift_edit"])
    doc["modules"]["transformer.h.1.mlp.c_proj"]["layer"] = 2
    save_file(tensors, str(patch_file), metadata={**meta, "shift_edit": json.dumps(doc)})
    with pytest.raises(PatchChecksumError, match="checksum mismatch"):
        se.read_patch(patch_file)


def test_checksum_missing_from_a_v2_patch_is_refused_v1_patch_warns(patch_file, byte_tok, caplog):
    with safe_open(str(patch_file), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(patch_file), metadata={"shift_edit": meta["shift_edit"]})
    with pytest.raises(PatchChecksumError, match="checksum is missing"):
        se.read_patch(patch_file)
    doc = json.loads(meta["shift_edit"])
    doc["format_version"] = 1  # a patch written before checksums (no base fingerprint): read with a warning when asked
    del doc["base_fingerprint"]
    save_file(tensors, str(patch_file), metadata={"shift_edit": json.dumps(doc)})
    model = tiny_model("gpt2")
    with caplog.at_level(logging.WARNING, logger="shift_edit.files.patch"):
        se.apply_patch(model, patch_file, allow_unchecksummed=True, base_check="matrices")
    assert "has no checksum" in caplog.text


def test_corrupted_adapter_is_refused(patch_file, tmp_path):
    out = tmp_path / "lora"
    se.export_lora(patch_file, out)
    se.apply_patch(tiny_model("gpt2"), out)  # intact: applies
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 1000  # scales the delta 1000x
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_model("gpt2")
    before = state(model)
    with pytest.raises(PatchChecksumError, match=f"{out}: checksum mismatch"):
        se.apply_patch(model, out)
    assert same(model, before)


# ----------------------------------------------------------------------------- 2. the edit guard

def test_absurd_step_is_refused_with_the_model_untouched(byte_tok):
    model = tiny_model("gpt2")
    before = state(model)
    hp = se.ShiftHyperParams(layers=[1], eta=1e30, eta_scaling="normalized", skip_if_predicted=False)
    with pytest.raises(EditRefusedError, match=r"above max_relative_norm 1\b.*--force"):
        se.edit(model, byte_tok, REQ, hp)
    assert same(model, before)


def test_non_finite_outputs_are_refused_even_without_a_norm_bound(byte_tok):
    model = tiny_model("gpt2")
    before = state(model)
    hp = se.ShiftHyperParams(layers=[1], eta=1e25, skip_if_predicted=False, max_relative_norm=None)
    with pytest.raises(EditRefusedError, match="non-finite"):
        se.edit(model, byte_tok, REQ, hp)
    assert same(model, before)  # applied, found NaN outputs, restored bit-exactly


def test_the_guard_pass_can_start_at_the_first_edited_block(byte_tok):
    """With the unedited model's block inputs over the prompts (:class:`PromptInputs`), the guard's pass runs only
    the blocks from the first edited one, and still finds non-finite outputs those blocks make."""
    from shift_edit.core.guard import PromptInputs, outputs_finite
    from shift_edit.core.requests import encode_prompt
    from shift_edit.model.architectures import ModelAdapter
    from shift_edit.model.resume import record_block_inputs

    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    texts = ["Messi plays for", "A longer prompt, padded beside the short one"]
    kept = PromptInputs(adapter)
    for t in texts:
        with record_block_inputs(adapter) as blocks, torch.no_grad():
            model(input_ids=torch.tensor([encode_prompt(byte_tok, t)]))
        kept.add(1, t, blocks[1][0])
    assert kept.start(0, texts) is None and kept.start(1, [*texts, "not kept"]) is None
    start = kept.start(1, texts)
    below = []
    handle = adapter.blocks()[0].register_forward_pre_hook(lambda *_: below.append(1))
    try:
        assert outputs_finite(model, byte_tok, texts, start=start)
        with torch.no_grad():
            adapter.module(adapter.ff2_name(2)).weight[0, 0] = float("nan")
        assert not outputs_finite(model, byte_tok, texts, start=start)
    finally:
        handle.remove()
    assert not below  # block 0 never ran


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_the_guard_pass_of_a_shift_edit_starts_at_its_layer(model_type, byte_tok, monkeypatch):
    """SHIFT keeps its pass's input of the edited block over the prompt; on every architecture the guard's pass
    starts there, and a non-finite edit is still refused with the model restored."""
    from shift_edit.core import editing

    starts = []
    real = editing.check_outputs

    def spy(model, tok, texts, orig, start=None):
        starts.append(start)
        return real(model, tok, texts, orig, start=start)

    monkeypatch.setattr(editing, "check_outputs", spy)
    model = tiny_model(model_type)
    se.edit(model, byte_tok, REQ, se.ShiftHyperParams(**OK)).undo()
    adapter = se.ModelAdapter(model)
    with torch.no_grad():
        adapter.module(adapter.ff2_name(2)).weight[0, 0] = float("inf")  # block 2 makes the outputs inf / NaN
    before = state(model)
    with pytest.raises(EditRefusedError, match="non-finite"):
        se.edit(model, byte_tok, REQ, se.ShiftHyperParams(**OK))
    assert [s[1] for s in starts] == [1, 1] and same(model, before)


def test_force_bypasses_the_guard(byte_tok):
    model = tiny_model("gpt2")
    hp = se.ShiftHyperParams(layers=[1], eta=50.0, skip_if_predicted=False)
    with pytest.raises(EditRefusedError):
        se.edit(model, byte_tok, REQ, hp)
    result = se.edit(model, byte_tok, REQ, hp, force=True)
    assert result.summary()[0]["relative_norm"] > DEFAULT_MAX_RELATIVE_NORM


@pytest.mark.parametrize("alg", se.algorithm_names())
def test_every_algorithm_has_the_bound(alg):
    import dataclasses

    cls = se.get_algorithm(alg).hparams_class
    field = {f.name: f for f in dataclasses.fields(cls)}["max_relative_norm"]
    assert field.default == DEFAULT_MAX_RELATIVE_NORM
    with pytest.raises(se.ShiftEditError, match="max_relative_norm: got -1.0"):
        se.ShiftHyperParams(**OK, max_relative_norm=-1.0)


def test_absurd_step_on_the_cli_writes_no_patch(tiny_dir, tmp_path, capsys):
    patch = tmp_path / "p.safetensors"
    args = ["edit", "--model", str(tiny_dir), "--prompt", "Messi plays for", "--target", "Paris", "--layer", "1",
            "--eta", "1e30", "--eta-scaling", "normalized", "--no-skip", "--save-patch", str(patch)]
    err = one_line_exit_2(capsys, main(args))
    assert "refusing the edit" in err and not patch.exists()
    args[args.index("1e30")] = "50"
    one_line_exit_2(capsys, main(args))
    # forced through; the tiny random model's target still is not the top-1: exit 3, outputs written
    assert main([*args, "--force"]) == 3 and patch.is_file()


def test_a_patch_over_the_bound_is_refused_unless_forced(tmp_path, byte_tok):
    hp = se.ShiftHyperParams(layers=[1], eta=50.0, skip_if_predicted=False)
    path = se.edit(tiny_model("gpt2"), byte_tok, REQ, hp, force=True).save_patch(tmp_path / "big.safetensors")
    model = tiny_model("gpt2")
    with pytest.raises(EditRefusedError):
        se.apply_patch(model, path, tok=byte_tok)
    se.apply_patch(model, path, tok=byte_tok, force=True)


# ----------------------------------------------------------------------------- 3. one line, exit 2

@pytest.mark.parametrize("prompt", ["{} and {} play for", "{name} plays for {}", "{} plays {", "{0}{} x"])
def test_bad_placeholders_are_one_clear_error(prompt, tmp_path, capsys):
    with pytest.raises(se.ShiftEditError, match="template|placeholder"):
        se.make_request({**REQ, "prompt": prompt})
    err = one_line_exit_2(capsys, main(["edit", "--model", "/nonexistent", "--prompt", prompt, "--subject", "Messi",
                                        "--target", "x", "--layer", "1", "--eta", "1"]))
    assert "cannot load" not in err  # found before the model is loaded
    rec = {"case_id": 1, "requested_rewrite": {**REQ, "prompt": prompt, "target_true": "Rome"},
           "paraphrase_prompts": [], "neighborhood_prompts": []}
    (tmp_path / "cf.json").write_text(json.dumps([rec]))
    with pytest.raises(se.ShiftEditError, match="record #0"):
        bdata.load_counterfact(tmp_path / "cf.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device, msg", [("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"), ("tpu", "unknown device"),
                                         ("xla", "unsupported device")])
def test_missing_device_is_one_line(device, msg, capsys):
    err = one_line_exit_2(capsys, main(["edit", "--model", "/nonexistent", "--prompt", "a", "--target", "b",
                                        "--layer", "1", "--eta", "1", "--device", device]))
    assert msg in err
    with pytest.raises(se.ShiftEditError, match=msg):
        se.load_model("/nonexistent", device=device)


def test_top_k_above_the_vocabulary_is_refused_before_the_edit(tiny_dir, tmp_path, capsys):
    patch = tmp_path / "p.safetensors"
    err = one_line_exit_2(capsys, main(["edit", "--model", str(tiny_dir), "--prompt", "Messi plays for", "--target",
                                        "Paris",
                                        "--layer", "1", "--eta", "0.05", "--top-k", "100000", "--save-patch",
                                        str(patch)]))
    assert "vocabulary size 260" in err and not patch.exists()


@pytest.mark.parametrize("flag", ["--save-patch", "--save", "--save-lora"])
def test_output_under_a_file_is_refused_before_loading(flag, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    target = blocker / "sub" / "out"
    err = one_line_exit_2(capsys, main(["edit", "--model", "/nonexistent", "--prompt", "a", "--target", "b",
                                        "--layer", "1", "--eta", "1", flag, str(target)]))
    assert "is a file, not a folder" in err and flag in err


def test_unwritable_output_roots_are_refused(tmp_path, capsys):
    err = one_line_exit_2(capsys, main(["edit", "--model", "/nonexistent", "--prompt", "a", "--target", "b",
                                        "--layer", "1", "--eta", "1", "--save-patch", "/proc/no/such/p.safetensors"]))
    assert "--save-patch" in err and "cannot load" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    err = one_line_exit_2(capsys, main(["edit", "--model", "/nonexistent", "--prompt", "a", "--target", "b",
                                        "--layer", "1", "--eta", "1", "--save", str(tmp_path / "full")]))
    assert "not an empty folder" in err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = one_line_exit_2(capsys, main(["bench", "--alg", "NONE", "--model", "/nonexistent", "--data", "/x.json",
                                        "--out", str(blocker / "results")]))
    assert "--out" in err


def test_malicious_pickle_checkpoint_is_one_line(tmp_path, capsys):
    folder = tmp_path / "evil"
    tiny_model("gpt2").config.save_pretrained(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    err = one_line_exit_2(capsys, main(["edit", "--model", str(folder), "--prompt", "a", "--target", "b",
                                        "--layer", "1", "--eta", "1"]))
    assert "refusing to load" in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(se.ShiftEditError):
        main(["--debug", "edit", "--model", "/nonexistent", "--prompt", "{} {}", "--subject", "s", "--target", "b",
              "--layer", "1", "--eta", "1"])
    with pytest.raises(se.ShiftEditError):
        main(["edit", "--model", "/nonexistent", "--prompt", "{} {}", "--subject", "s", "--target", "b",
              "--layer", "1", "--eta", "1", "--debug"])


# ----------------------------------------------------------------------------- 4. base contract

def test_strict_base_fingerprint_and_matrices_option(byte_tok, tmp_path):
    path = se.edit(tiny_model("gpt2"), byte_tok, REQ, se.ShiftHyperParams(**OK)).save_patch(tmp_path / "l1.safetensors")
    other_layer = tiny_model("gpt2")
    se.edit(other_layer, byte_tok, REQ, se.ShiftHyperParams(**{**OK, "layers": [2]}))  # layer 2 edited
    before = state(other_layer)
    with pytest.raises(se.PatchMismatchError, match="fingerprint differs"):
        se.apply_patch(other_layer, path)
    assert same(other_layer, before)
    se.apply_patch(other_layer, path, base_check="matrices")  # layer 1 itself is the base's: stacks
    assert not same(other_layer, before)
    with pytest.raises(se.ShiftEditError, match="base_check"):
        se.apply_patch(tiny_model("gpt2"), path, base_check="loose")


def test_patch_saved_after_an_edit_records_the_base_fingerprint(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    fp = se.files.io.model_fingerprint(model)
    result = se.edit(model, byte_tok, REQ, se.ShiftHyperParams(**OK))
    meta, _ = se.read_patch(result.save_patch(tmp_path / "p.safetensors"))
    assert meta["base_fingerprint"] == fp != se.files.io.model_fingerprint(model)


# ----------------------------------------------------------------------------- 5./6. bench

def _rec(i):
    return {"case_id": i, "requested_rewrite": {**REQ, "subject": f"Sub{i}", "target_true": {"str": "Rome"}},
            "paraphrase_prompts": [f"Sub{i} is with"], "neighborhood_prompts": ["Totti plays for"]}


def _bench(tmp_path, byte_tok, out, hp=None, **cfg):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([_rec(i) for i in range(3)]))
    # no generation of either family: each record is its own group (claimed and resumed by record)
    config = BenchConfig(alg="SHIFT", hparams=hp or se.ShiftHyperParams(**OK), skip_generation=True,
                         **{"skip_wild": True, **cfg})
    return run_bench(tiny_model("llama"), byte_tok, bdata.load_counterfact(path), config, out,
                     data_info={"path": str(path), "sha256": bdata.file_sha256(path)}, model_name="tiny-llama",
                     progress=False, rank=0, world_size=1)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claims_are_exclusive_and_stale_ones_recovered(tmp_path):
    assert try_claim(tmp_path, [1, 2]) is not None
    assert try_claim(tmp_path, [2, 3]) is None  # 2 is held (by this live process)
    assert not claim_path(tmp_path, 3).exists()  # all or nothing
    claim_path(tmp_path, 4).write_text(json.dumps({"host": os.uname().nodename, "pid": _dead_pid()}))
    with claimed(tmp_path, [4]) as mine:
        assert mine and json.loads(claim_path(tmp_path, 4).read_text())["pid"] == os.getpid()
    assert not claim_path(tmp_path, 4).exists()
    claim_path(tmp_path, 5).write_text(json.dumps({"host": "another-host", "pid": 1}))
    with claimed(tmp_path, [5]) as mine:
        assert not mine  # another host's claim is never broken


def test_a_case_claimed_by_a_live_worker_is_left_to_it(tmp_path, byte_tok):
    run = _bench(tmp_path, byte_tok, tmp_path / "out")  # makes the run dir; all 3 cases done
    (run / "case_1.json").unlink()
    (run / "case_2.json").unlink()
    claim_path(run, 1).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))  # alive
    claim_path(run, 2).write_text(json.dumps({"host": os.uname().nodename, "pid": _dead_pid()}))  # crashed
    assert _bench(tmp_path, byte_tok, tmp_path / "out") == run
    assert not (run / "case_1.json").exists()  # the live worker's
    assert (run / "case_2.json").is_file() and not claim_path(run, 2).exists()  # taken over, done, released


def test_two_identical_bench_commands_split_the_cases(tmp_path, byte_tok):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([_rec(i) for i in range(6)]))
    hp = tmp_path / "hp.yaml"
    hp.write_text("alg_name: SHIFT\nlayers: [1]\neta: 0.05\nskip_if_predicted: false\n")
    args = [sys.executable, "-m", "shift_edit", "-v", "bench", "--alg", "SHIFT", "--model", str(folder), "--hparams",
            str(hp), "--data", str(data), "--skip-generation", "--skip-wild", "--no-progress",
            "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    run = tmp_path / "out" / "SHIFT" / "run_000"
    assert sorted(p.name for p in run.glob("case_*.json")) == [f"case_{i}.json" for i in range(6)]
    assert not list(run.glob(".claim_*")) and not (tmp_path / "out" / "SHIFT" / "run_001").exists()


def test_early_bench_errors_leave_no_run_folder(tmp_path, byte_tok, capsys):
    out = tmp_path / "out"
    with pytest.raises(se.ShiftEditError, match="cannot read WikiText"):
        _bench(tmp_path, byte_tok, out, ppl_every=1, wikitext=str(tmp_path / "missing.raw"))
    with pytest.raises(se.ShiftEditError, match="out of range"):
        _bench(tmp_path, byte_tok, out, hp=se.ShiftHyperParams(**{**OK, "layers": [7]}))
    assert not list(out.glob("*/run_*"))
    err = one_line_exit_2(capsys, main(["bench", "--alg", "NONE", "--model", "/nonexistent", "--data",
                                        str(tmp_path / "cf.json"), "--ppl-every", "1", "--wikitext", "missing.raw",
                                        "--out", str(out)]))
    assert "--wikitext missing.raw: file not found" in err and not list(out.glob("*/run_*"))


# ----------------------------------------------------------------------------- 7. smaller

def test_invalid_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("alg_name: SHIFT\nlayers: [1, 2\neta: 1\n  x: : y\n")
    with pytest.raises(se.ShiftEditError) as info:
        se.load_hparams(bad)
    assert "\n" not in str(info.value) and "line" in str(info.value)
    one_line_exit_2(capsys, main(["edit", "--model", "/nonexistent", "--prompt", "a", "--target", "b", "--hparams",
                                  str(bad)]))


def test_prompt_longer_than_the_context_is_refused(byte_tok):
    model = tiny_model("gpt2")  # 128 positions
    with pytest.raises(se.ShiftEditError, match="longer than the model's context of 128"):
        se.edit(model, byte_tok, {**REQ, "prompt": "x" * 200 + " {} plays for"}, se.ShiftHyperParams(**OK))


def test_restore_weights_with_a_wrong_shape_is_a_shift_edit_error(byte_tok):
    model = tiny_model("gpt2")
    before = state(model)
    name = "transformer.h.1.mlp.c_proj.weight"
    with pytest.raises(se.ShiftEditError, match="has shape"):
        se.restore_weights(model, {"transformer.h.0.mlp.c_proj.weight": before["transformer.h.0.mlp.c_proj.weight"],
                                   name: torch.zeros(3, 3)})
    assert same(model, before)  # checked before any copy


def test_undo_is_still_bit_exact_under_the_guard(byte_tok):
    model = tiny_model("llama")
    before = state(model)
    t0 = time.perf_counter()
    results = [se.edit(model, byte_tok, {**REQ, "subject": f"S{i}"}, se.ShiftHyperParams(**OK)) for i in range(10)]
    assert time.perf_counter() - t0 < 30
    for r in reversed(results):
        r.undo()
    assert same(model, before)
