"""The helpers of cross-cutting jobs: atomic folder and file writes, owned hooks, weight restore,
the JSON record reader (synthetic, no model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shift_edit.core.deltas import restore_weights, swapped_weights
from shift_edit.core.errors import ShiftEditError
from shift_edit.files.io import atomic_dir, atomic_file
from shift_edit.files.json_records import read_json_records
from shift_edit.model.hooks import owned_hooks


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_dir_moves_a_filled_folder_into_place(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and not dest.exists()
        (tmp / "a.txt").write_text("a")
    assert (dest / "a.txt").read_text() == "a"
    assert _siblings(dest) == ["out"]


def test_atomic_dir_leaves_nothing_on_an_error(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("boom")
    assert _siblings(dest) == []


def test_atomic_dir_fills_an_empty_folder_and_replaces_only_when_asked(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("1")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    with pytest.raises(OSError):  # a non-empty folder is not replaced without replace=True
        with atomic_dir(dest) as tmp:
            (tmp / "other.txt").write_text("2")
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and _siblings(dest) == ["out"]
    with atomic_dir(dest, replace=True, share=True) as tmp:
        (tmp / "other.txt").write_text("2")
    assert [p.name for p in dest.iterdir()] == ["other.txt"] and _siblings(dest) == ["out"]
    assert dest.stat().st_mode & 0o055  # shared: not mkdtemp's private 0700


def test_atomic_file(tmp_path):
    dest = tmp_path / "x.bin"
    with atomic_file(dest) as tmp:
        tmp.write_bytes(b"12")
    assert dest.read_bytes() == b"12" and _siblings(dest) == ["x.bin"]
    with pytest.raises(RuntimeError):
        with atomic_file(dest) as tmp:
            tmp.write_bytes(b"34")
            raise RuntimeError
    assert dest.read_bytes() == b"12" and _siblings(dest) == ["x.bin"]


def test_owned_hooks_remove_exactly_their_own():
    lin = nn.Linear(2, 2)
    calls = []
    foreign = lin.register_forward_hook(lambda *a: calls.append("foreign"))
    with pytest.raises(RuntimeError):
        with owned_hooks() as hooks:
            hooks.forward_hook(lin, lambda *a: calls.append("post"))
            pre = hooks.forward_pre_hook(lin, lambda *a: calls.append("pre"))
            lin(torch.zeros(1, 2))
            assert calls == ["pre", "foreign", "post"]
            hooks.remove(pre)
            calls.clear()
            lin(torch.zeros(1, 2))
            assert calls == ["foreign", "post"]
            raise RuntimeError
    calls.clear()
    lin(torch.zeros(1, 2))
    assert calls == ["foreign"]  # ours are gone, the one we did not add stays
    foreign.remove()


def test_restore_weights_checks_everything_before_copying():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ShiftEditError, match="does not have"):
        restore_weights(model, {"0.weight": orig["0.weight"], "nope.weight": orig["0.weight"]})
    with pytest.raises(ShiftEditError, match="has shape"):
        restore_weights(model, {"0.weight": orig["0.weight"], "1.weight": orig["0.weight"]})
    assert all(torch.equal(p, edited[n]) for n, p in model.named_parameters())  # nothing was copied
    ids = [id(p) for p in model.parameters()]
    restore_weights(model, orig)
    assert all(torch.equal(p, orig[n]) for n, p in model.named_parameters())
    assert ids == [id(p) for p in model.parameters()]  # in place


def test_swapped_weights_restores_bit_exactly_also_on_an_error():
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with pytest.raises(RuntimeError):
        with swapped_weights(model, {"weight": torch.zeros(2, 3)}):
            assert torch.count_nonzero(model.weight) == 0
            raise RuntimeError
    assert torch.equal(model.weight, before)


def test_read_json_records(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"data": [{"case_id": 1}]}')
    assert read_json_records(p, unwrap="data") == [{"case_id": 1}]
    with pytest.raises(ShiftEditError, match="expected a JSON list of records, got dict"):
        read_json_records(p)
    p.write_text('[{"case_id": 7}, {"case_id": ')
    with pytest.raises(ShiftEditError, match=r"record #1 \(the one after case_id 7\) is truncated"):
        read_json_records(p)
    with pytest.raises(ShiftEditError, match="does not exist"):
        read_json_records(tmp_path / "missing.json")
