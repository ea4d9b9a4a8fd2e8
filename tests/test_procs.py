"""``bench --procs N`` is bounded by the cores and the records: a larger N is lowered with one warning."""

from __future__ import annotations

import pytest
from _tiny import tiny_model
from test_bench import rome_record, write

from shift_edit.cli import bench as bench_cli
from shift_edit.cli import main


@pytest.fixture
def bench_args(tmp_path, byte_tok):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tok.save_pretrained(folder)
    hp = tmp_path / "hp.yaml"
    hp.write_text("alg_name: SHIFT\nlayers: [1]\neta: 2.0\nskip_if_predicted: false\n")

    def args(n_records: int) -> list[str]:
        data = write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(n_records)],
                     name=f"cf{n_records}.json")
        return ["bench", "--alg", "SHIFT", "--model", str(folder), "--hparams", str(hp), "--data", str(data),
                "--skip-generation", "--skip-wild", "--no-progress", "--out", str(tmp_path / "out")]
    return args


@pytest.fixture
def launched(monkeypatch) -> list[int]:
    seen: list[int] = []
    monkeypatch.setattr(bench_cli, "_launch", lambda argv, procs: seen.append(procs) or 0)
    return seen


@pytest.mark.parametrize("cores, records, procs, want, named", [
    (2, 2, 4, 2, "2 core(s) and 2 share(s) of records"),  # the audit's case: 4 processes on 2 records and 2 cores
    (2, 10, 4, 2, "2 core(s)"),
    (8, 3, 4, 3, "3 share(s) of records"),
])
def test_procs_above_the_cores_or_the_records_is_lowered_with_one_warning(
    cores, records, procs, want, named, bench_args, launched, monkeypatch, capsys
):
    monkeypatch.setattr(bench_cli, "available_cores", lambda: cores)
    assert main([*bench_args(records), "--procs", str(procs)]) == 0
    assert launched == [want]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0] == f"warning: --procs {procs}: this run has {named}; running {want} processes"


def test_procs_within_bounds_says_nothing(bench_args, launched, monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "available_cores", lambda: 4)
    assert main([*bench_args(4), "--procs", "2"]) == 0
    assert launched == [2] and not capsys.readouterr().err.strip()


def test_one_record_runs_in_this_process(bench_args, launched, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_cli, "available_cores", lambda: 2)
    assert main([*bench_args(1), "--procs", "2"]) == 0
    assert launched == []  # lowered to 1: no child process, the run is made here
    assert (tmp_path / "out" / "SHIFT" / "run_000" / "case_0.json").is_file()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert err == ["warning: --procs 2: this run has 1 share(s) of records; running 1 process"]
