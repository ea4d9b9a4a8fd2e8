"""A patch or adapter cannot be downgraded to the unchecksummed format 1: a format-1 file is read only if it
carries no field of a later format, and only when asked (``allow_unchecksummed=True`` / ``--allow-unchecksummed``)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import byte_tokenizer, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import shift_edit as se
from shift_edit.cli import main
from shift_edit.files.patch import CHECKSUM_KEY, PatchChecksumError

REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": " Rome"}}


@pytest.fixture
def patch_file(tmp_path, byte_tok):
    hp = se.ShiftHyperParams(layers=[1], eta=0.5, skip_if_predicted=False, max_relative_norm=None)
    return se.edit(tiny_model("gpt2"), byte_tok, REQ, hp).save_patch(tmp_path / "p.safetensors")


@pytest.fixture
def tiny_dir(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("gpt2").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _rewrite(path, scale: float = 1.0, drop: tuple[str, ...] = ()) -> None:
    """Relabel a patch as format 1 without its checksum, its tensors scaled by ``scale``, ``drop`` removed from its
    metadata."""
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) * scale for k in fh.keys()}
    doc = json.loads(meta["shift_edit"])
    doc["format_version"] = 1
    for key in drop:
        del doc[key]
    save_file(tensors, str(path), metadata={"shift_edit": json.dumps(doc)})


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_format_2_patch_relabelled_as_format_1_is_refused_even_when_unchecksummed_files_are_allowed(
    patch_file, tiny_dir, capsys
):
    _rewrite(patch_file, scale=1.5)  # the audit's downgrade: version 1, no checksum, weights x1.5
    model = tiny_model("gpt2")
    before = _state(model)
    for allow in (False, True):
        with pytest.raises(PatchChecksumError, match="says format version 1 but carries base_fingerprint"):
            se.apply_patch(model, patch_file, allow_unchecksummed=allow, base_check="matrices")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    capsys.readouterr()
    assert main(["apply-patch", str(patch_file), "--model", str(tiny_dir), "--allow-unchecksummed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries base_fingerprint of a later format" in err[0]


def test_a_format_1_patch_needs_the_flag(patch_file, tiny_dir, tmp_path, capsys, caplog):
    _rewrite(patch_file, drop=("base_fingerprint",))  # as written before checksums
    model = tiny_model("gpt2")
    before = _state(model)
    with pytest.raises(PatchChecksumError, match=r"allow_unchecksummed=True \(--allow-unchecksummed\)"):
        se.apply_patch(model, patch_file, base_check="matrices")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    capsys.readouterr()
    out = tmp_path / "saved"
    assert main(["apply-patch", str(patch_file), "--model", str(tiny_dir), "--base-check", "matrices", "--save",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-unchecksummed" in err[0] and not out.exists()
    assert main(["export-lora", str(patch_file), str(tmp_path / "lora")]) == 2
    assert "--allow-unchecksummed" in capsys.readouterr().err and not (tmp_path / "lora").exists()
    # asked for: applied, with a warning that it cannot be verified
    caplog.clear()
    result = se.apply_patch(model, patch_file, base_check="matrices", allow_unchecksummed=True)
    assert result.deltas and "has no checksum" in caplog.text
    assert main(["apply-patch", str(patch_file), "--model", str(tiny_dir), "--base-check", "matrices",
                 "--allow-unchecksummed"]) == 0
    assert main(["export-lora", str(patch_file), str(tmp_path / "lora"), "--allow-unchecksummed"]) == 0


def test_an_adapter_relabelled_as_format_1_is_refused(patch_file, tmp_path):
    out = tmp_path / "lora"
    se.export_lora(patch_file, out)
    side = json.loads((out / "shift_edit.json").read_text())
    side["format_version"] = 1
    (out / "shift_edit.json").write_text(json.dumps(side))
    with pytest.raises(PatchChecksumError, match="says format version 1"):
        se.apply_patch(tiny_model("gpt2"), out, allow_unchecksummed=True, base_check="matrices")
    # also without the checksum in the weights file: the side file's base fingerprint gives it away
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as fh:
        header, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    assert CHECKSUM_KEY in header
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PatchChecksumError, match="carries base_fingerprint of a later format"):
        se.apply_patch(tiny_model("gpt2"), out, allow_unchecksummed=True, base_check="matrices")
