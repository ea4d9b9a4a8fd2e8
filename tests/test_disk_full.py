"""A full disk while saving weights (``edit --save``, ``apply-patch --save``): exit code 2, one line, nothing
half-written. Run in a tiny tmpfs mounted in a user namespace (``unshare -rm``); skipped where that is not allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import byte_tokenizer, tiny_model

import shift_edit as se

REPO = Path(__file__).resolve().parents[1]
EDIT = ["--prompt", "Messi plays for", "--target", "Paris", "--layer", "1", "--eta", "1", "--no-skip"]


def in_tiny_filesystem(tmp_path: Path, size: str, argv: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -m shift_edit ARGV`` with ``{fs}`` in its arguments replaced by a fresh tmpfs of ``size``;
    returns the process and what the tmpfs holds afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    mnt, listing = tmp_path / "tiny_fs", tmp_path / "tiny_fs.listing"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; m="$2"; out="$3"; shift 3; "$@"; rc=$?; '
              'ls -A "$m" > "$out"; exit $rc')
    cmd = [sys.executable, "-m", "shift_edit", *[a.replace("{fs}", str(mnt)) for a in argv]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", size, str(mnt), str(listing), *cmd],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 99, proc.stderr
    return proc, listing.read_text().split()


@pytest.fixture
def tiny_dir(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("gpt2").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size > 200_000  # does not fit the tiny filesystem
    return folder


def test_edit_save_on_a_full_disk_exits_2_and_writes_nothing(tiny_dir, tmp_path):
    proc, left = in_tiny_filesystem(tmp_path, "64k", ["edit", "--model", str(tiny_dir), *EDIT, "--save", "{fs}/edited",
                                                      "--save-patch", "{fs}/edit.safetensors"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and "no space left" in err[0].lower() and "Traceback" not in proc.stderr
    assert left == []  # neither the model folder, nor the patch (all or nothing), nor a temporary file


def test_apply_patch_save_on_a_full_disk_exits_2_and_writes_nothing(tiny_dir, tmp_path, byte_tok):
    hp = se.ShiftHyperParams(layers=[1], eta=1.0, skip_if_predicted=False, max_relative_norm=None)
    patch = se.edit(tiny_model("gpt2"), byte_tok, {"prompt": "Messi plays for", "target_new": "Paris"}, hp).save_patch(
        tmp_path / "p.safetensors")
    proc, left = in_tiny_filesystem(tmp_path, "64k", ["apply-patch", str(patch), "--model", str(tiny_dir),
                                                      "--save", "{fs}/patched"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and "no space left" in err[0].lower()
    assert left == []
