"""Everything read back from disk is verified first: one flipped bit in a statistics, generic-sample, z*,
converted-model or sequential-state entry is rebuilt with one warning (the state, which cannot be rebuilt,
is refused in one line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from _tiny import byte_tokenizer, tiny_model
from test_bench import rome_record, write

import shift_edit
import shift_edit.model.loading as loading
from shift_edit.algorithms.locate import memit as memit_mod
from shift_edit.algorithms.locate import zstar as zstar_mod
from shift_edit.algorithms.locate.memit import MEMITHyperParams
from shift_edit.bench.seq_state import SequentialState, load_state, save_state
from shift_edit.cli import main
from shift_edit.core.errors import ShiftEditError
from shift_edit.core.memory import EditMemory
from shift_edit.core.requests import make_request
from shift_edit.files.io import MANIFEST_NAME
from shift_edit.model.covariance import layer_stats
from shift_edit.model.generic_sample import generic_sample


def flip_bit(path: Path, at: float = 0.5) -> None:
    """Flip one bit of ``path`` at the fraction ``at`` of its length."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "shift_edit" in r.name]


def _only_file(pattern: str) -> Path:
    (path,) = list((loading.cache_dir()).rglob(pattern))
    return path


def test_statistics_with_a_flipped_bit_are_rebuilt_with_one_warning(byte_tok, corpus, caplog):
    model = tiny_model("llama")
    kw = dict(corpus=corpus, n_tokens=60, max_length=32, progress=False)
    first = layer_stats(model, byte_tok, [1], **kw)[1]
    for target in ("*.pt", "*.json"):
        path = _only_file(f"stats/**/{target}")
        if target == "*.json":  # one bit of a digit in the metadata: 60 tokens read as 61... still valid JSON
            text = path.read_text()
            i = text.index('"n_texts": ') + len('"n_texts": ')
            path.write_text(text[:i] + chr(ord(text[i]) ^ 0x01) + text[i + 1:])
            json.loads(path.read_text())
        else:
            flip_bit(path)
        caplog.clear()
        rebuilt = layer_stats(model, byte_tok, [1], **kw)[1]
        (warning,) = [w for w in _warnings(caplog) if "statistics cache" in w]
        assert "fails its checksum" in warning and "rebuilding" in warning
        assert torch.equal(rebuilt.mom2, first.mom2) and rebuilt.meta["n_texts"] == first.meta["n_texts"]
        caplog.clear()
        layer_stats(model, byte_tok, [1], **kw)  # the rebuilt entry verifies
        assert not _warnings(caplog)


def test_a_generic_sample_with_a_flipped_bit_is_rebuilt_with_one_warning(byte_tok, corpus, caplog):
    model = tiny_model("llama")
    kw = dict(corpus=corpus, skip_tokens=20, n_tokens=40, max_length=32)
    first = generic_sample(model, byte_tok, [1], **kw)[1]
    flip_bit(_only_file("stats/**/*ff1sample*.pt"))
    caplog.clear()
    again = generic_sample(model, byte_tok, [1], **kw)[1]
    (warning,) = _warnings(caplog)
    assert "generic sample cache" in warning and "fails its checksum" in warning
    assert torch.equal(again, first)


def test_a_zstar_with_a_flipped_bit_is_recomputed_with_one_warning(byte_tok, corpus, caplog, monkeypatch):
    model = tiny_model("llama")
    hp = MEMITHyperParams(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[3, 2]],
                          mom2_n_tokens=60, mom2_max_length=32, mom2_corpus=corpus, skip_if_predicted=False,
                          mom2_update_weight=50.0, zstar_cache=True)
    req = make_request({"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": "Rome"}})
    optimised = []
    real = zstar_mod.optimise_delta
    monkeypatch.setattr(zstar_mod, "optimise_delta", lambda *a, **k: optimised.append(1) or real(*a, **k))
    first = memit_mod.compute_memit(model, byte_tok, [req], hp)
    cached = memit_mod.compute_memit(model, byte_tok, [req], hp)
    assert len(optimised) == 1 and cached.info[0]["zstar_from_cache"]
    for target in ("zstar/**/*.pt", "zstar/**/*.json"):
        path = _only_file(target)
        if target.endswith(".json"):  # a bit of the stored loss: still valid JSON
            text = path.read_text()
            i = text.index('"loss_last": ') + len('"loss_last": ') + 2
            path.write_text(text[:i] + chr(ord(text[i]) ^ 0x01) + text[i + 1:])
            json.loads(path.read_text())
        else:
            flip_bit(path, 0.9)
        caplog.clear()
        again = memit_mod.compute_memit(model, byte_tok, [req], hp)
        (warning,) = _warnings(caplog)
        assert "z* cache" in warning and "fails its checksum" in warning
        assert "zstar_from_cache" not in again.info[0]
        for a, b in zip(first.deltas, again.deltas):
            assert torch.equal(a.canonical(), b.canonical())
    assert len(optimised) == 3


@pytest.fixture
def fake_alias(tmp_path, monkeypatch):
    """The smollm2-135m alias backed by a tiny model 'converted' from a stand-in GGUF file; counts conversions."""
    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"stand-in")
    monkeypatch.setattr(loading, "alias_gguf_path", lambda alias: gguf)
    conversions = []

    def convert(path):
        conversions.append(path)
        return tiny_model("llama"), byte_tokenizer()

    monkeypatch.setattr(loading, "_load_gguf", convert)
    monkeypatch.setattr(loading, "_VERIFIED_FOLDERS", set())
    return conversions


def test_a_converted_model_with_a_flipped_bit_is_converted_again_with_one_warning(fake_alias, caplog, monkeypatch):
    folder = loading._cached_alias("smollm2-135m")
    assert len(fake_alias) == 1 and (folder / MANIFEST_NAME).is_file()
    assert loading._cached_alias("smollm2-135m") == folder and len(fake_alias) == 1  # verified, reused
    want = {k: v.clone() for k, v in shift_edit.load_model("smollm2-135m")[0].state_dict().items()}  # not the mmap
    for name in ("model.safetensors", "tokenizer.json", MANIFEST_NAME):
        flip_bit(folder / name, 0.8)
        monkeypatch.setattr(loading, "_VERIFIED_FOLDERS", set())  # a new process
        caplog.clear()
        model, _ = shift_edit.load_model("smollm2-135m")
        (warning,) = _warnings(caplog)
        assert "converted model" in warning and "converting" in warning and "again" in warning
        bad = [k for k, v in model.state_dict().items() if not torch.equal(want[k], v)]
        assert not bad, bad
    assert len(fake_alias) == 4
    # a folder converted before the manifest existed cannot be verified: converted again
    (folder / MANIFEST_NAME).unlink()
    monkeypatch.setattr(loading, "_VERIFIED_FOLDERS", set())
    caplog.clear()
    loading._cached_alias("smollm2-135m")
    (warning,) = _warnings(caplog)
    assert MANIFEST_NAME in warning and len(fake_alias) == 5


def _state(tmp_path, model):
    st = SequentialState()
    st.n_batches, st.n_edits, st.touched = 2, 2, ["model.layers.1.mlp.down_proj.weight"]
    st.batches = [{"n": 1}, {"n": 1}]  # one record per batch, as the run keeps them
    memory = EditMemory()
    memory.add({st.touched[0]: torch.randn(2, model.config.intermediate_size)})
    with torch.no_grad():
        model.get_parameter(st.touched[0]).add_(0.01)
    save_state(tmp_path / "state", st, model, memory, "fp")
    return st, memory


def test_a_sequential_state_with_a_flipped_bit_is_refused_in_one_line(tmp_path):
    model = tiny_model("llama")
    st, memory = _state(tmp_path, model)
    edited = model.get_parameter(st.touched[0]).detach().clone()
    fresh = tiny_model("llama")
    loaded_st, loaded_mem, originals = load_state(tmp_path / "state", fresh, "fp")
    assert torch.equal(fresh.get_parameter(st.touched[0]), edited) and loaded_st.n_edits == 2
    assert torch.equal(loaded_mem.keys(st.touched[0]), memory.keys(st.touched[0]))
    assert torch.equal(originals[st.touched[0]], tiny_model("llama").get_parameter(st.touched[0]))
    for target in ("state_*.pt", "state.json"):
        _state(tmp_path, tiny_model("llama"))
        (path,) = list((tmp_path / "state").glob(target))
        if target == "state.json":  # one bit of the number of edits: still valid JSON
            text = path.read_text()
            i = text.index('"n_edits": ') + len('"n_edits": ')
            path.write_text(text[:i] + chr(ord(text[i]) ^ 0x01) + text[i + 1:])
        else:
            flip_bit(path)
        untouched = tiny_model("llama")
        with pytest.raises(ShiftEditError) as err:
            load_state(tmp_path / "state", untouched, "fp")
        msg = str(err.value)
        assert "\n" not in msg and "fails its checksum" in msg and "delete" in msg
        assert torch.equal(untouched.get_parameter(st.touched[0]), tiny_model("llama").get_parameter(st.touched[0]))


def test_the_cli_exits_2_on_a_damaged_sequential_state(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    data = write(tmp_path, [rome_record(i, subject=f"S{i}q") for i in range(2)])
    hp = tmp_path / "ft.yaml"
    hp.write_text("alg_name: FT\nlayers: [1]\nsteps: 2\nlr: 0.01\nskip_if_predicted: false\nmax_relative_norm: null\n")
    argv = ["bench", "--model", str(folder), "--alg", "FT", "--hparams", str(hp), "--data", str(data),
            "--out", str(tmp_path / "out"), "--sequential", "2", "--eval-at", "1", "--ppl-lines", "0", "--save-every",
            "1",
            "--no-progress"]
    assert main(argv) == 0
    (run_dir,) = list((tmp_path / "out" / "FT").glob("seq_*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "finished": False}))  # as if killed before the end
    flip_bit(next((run_dir / "state").glob("state_*.pt")))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved state" in err[0] and "fails its checksum" in err[0]


def test_a_saved_edit_memory_with_a_flipped_bit_is_refused(tmp_path):
    memory = EditMemory()
    memory.add({"model.layers.1.mlp.down_proj.weight": torch.randn(3, 16)})
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    assert torch.equal(EditMemory.load(path).keys("model.layers.1.mlp.down_proj.weight"),
                       memory.keys("model.layers.1.mlp.down_proj.weight"))
    flip_bit(path, 0.9)
    with pytest.raises(ShiftEditError, match="fails its checksum"):
        EditMemory.load(path)
