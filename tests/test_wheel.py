"""Issue 18: the built wheel works outside the checkout.

Builds the wheel, installs it without dependencies into a throwaway folder (torch and the rest
come from the running environment), then, from an empty folder, runs ``shift-edit edit`` on
SmolLM2 and a 3-record ``bench`` and checks that the installed copy, not the checkout, ran.
Part of ``make test`` (CI); about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools not installed: cannot build the wheel offline")
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w",
          str(root / "dist")],
         cwd=root, env=env)
    (wheel,) = (root / "dist").glob("shift_edit-*.whl")
    target = root / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], cwd=root,
         env=env)
    empty = root / "empty"
    empty.mkdir()
    env["PYTHONPATH"] = str(target)
    return wheel, target, empty, env


def test_wheel_ships_every_hparams_file(installed):
    import zipfile

    wheel, target, _empty, _env = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    repo = {
        f"shift_edit/_hparams/{p.relative_to(REPO / 'hparams').as_posix()}" for p in (REPO / "hparams").rglob("*.yaml")
    }
    assert repo and repo <= names
    assert (target / "shift_edit" / "_hparams" / "SHIFT" / "smollm2-135m.yaml").is_file()


def _records(n: int) -> list[dict]:
    """Authored CounterFact-format records (ROME's schema), so the test needs no shared data."""
    facts = [("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
             ("Toko Yasuda", "{} plays the", "piano", "guitar"),
             ("Apple A5", "{} is created by", "Google", "Apple")]
    return [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": p,
                "subject": s,
                "relation_id": "P0",
                "target_new": {"str": new, "id": "Q1"},
                "target_true": {"str": old, "id": "Q2"},
            },
            "paraphrase_prompts": [f"In short, {p.format(s)}"],
            "neighborhood_prompts": [p.format("someone else")],
            "attribute_prompts": [],
            "generation_prompts": [f"{s} is"],
        }
        for i, (s, p, new, old) in enumerate(facts[:n])
    ]


def test_installed_wheel_edits_and_benches_from_an_empty_folder(installed, smollm2, tmp_path):
    _wheel, target, empty, env = installed
    data_dir = tmp_path / "data"  # found through $SHIFT_EDIT_DATA by its data set name, as a user's folder would be
    data_dir.mkdir()
    (data_dir / "counterfact-original-format-subset837.json").write_text(json.dumps(_records(3)))
    probe = _run([sys.executable, "-c", "import shift_edit, shift_edit.core.shipped_hparams as r; "
                  "print(shift_edit.__file__); print(r.shipped_hparams('SHIFT', 'smollm2-135m'))"], cwd=empty, env=env)
    module, hparams = probe.stdout.split()
    assert Path(module).is_relative_to(target) and Path(hparams).is_relative_to(target), probe.stdout
    cli = [sys.executable, str(target / "bin" / "shift-edit")] if (target / "bin" / "shift-edit").is_file() else \
        [sys.executable, "-m", "shift_edit"]
    env = {**env, "SHIFT_EDIT_DATA": str(data_dir), "OMP_NUM_THREADS": "2"}
    out = _run([*cli, "edit", "--model", "smollm2-135m", "--prompt", "The Eiffel Tower is located in the city of",
                "--target", "Rome", "--save-patch", "edit.safetensors"], cwd=empty, env=env)
    assert "after:  ' Rome'" in out.stdout and "no -> yes" in out.stdout
    assert (empty / "edit.safetensors").is_file()
    _run([*cli, "bench", "--alg", "SHIFT", "--model", "smollm2-135m", "--data", "counterfact-subset", "--limit", "3",
          "--skip-generation", "--skip-wild", "--no-kl", "--no-progress", "--out", "res"], cwd=empty, env=env)
    (run,) = (empty / "res" / "SHIFT").glob("run_*")
    assert len(list(run.glob("case_*.json"))) == 3
    params = json.loads((run / "params.json").read_text())
    assert params["provenance"]["git"]["commit"] is None, "the installed copy ran, not the checkout"
