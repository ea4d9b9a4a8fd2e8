"""Sequential (lifelong) editing: compounding, the unedited reference, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny import byte_tokenizer, tiny_model
from test_bench import easyedit_record, rome_record, write

import shift_edit as se
from shift_edit.bench import counterfact as bdata
from shift_edit.bench.metrics import CaseScorer, metrics_from_scores
from shift_edit.bench.seq_scoring import record_values
from shift_edit.bench.sequential import SequentialConfig, run_sequential

REPO = Path(__file__).resolve().parents[1]
# tiny random weights are small: a few FT steps change them by more than the guard's default bound
FT = dict(layers=[1], steps=3, lr=1e-2, skip_if_predicted=False, max_relative_norm=None)


def _records(n):
    objs = ["Paris", "Rome", "Oslo", "Lima"]
    return [rome_record(i, subject=f"S{i}q", new=objs[i % 4], true=objs[(i + 1) % 4]) for i in range(n)]


def _wiki(tmp_path):
    p = tmp_path / "wiki.txt"
    p.write_text("\n".join(["The quick brown fox jumps over the lazy dog, again and again today."] * 4) + "\n")
    return str(p)


def _run(model, tok, path, out, **kw):
    cfg = SequentialConfig(alg=kw.pop("alg", "FT"), hparams=kw.pop("hparams", se.FTHyperParams(**FT)), **kw)
    return run_sequential(model, tok, bdata.load_counterfact(path), cfg, out,
                          data_info={"path": str(path), "sha256": bdata.file_sha256(path)}, model_name="tiny-llama",
                          progress=False)


def test_each_batch_is_computed_on_the_edited_model(byte_tok, tmp_path):
    """Edit 2 is computed on the model after edit 1: its delta differs from the one computed on the
    unedited model, and the run's final weights are W0 + Δ1 + Δ2(W0 + Δ1)."""
    path = write(tmp_path, _records(2))
    cases = bdata.load_counterfact(path)
    hp = se.FTHyperParams(**FT)
    model = tiny_model("llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_dir = _run(model, byte_tok, path, tmp_path / "out", total=2, ppl=False)
    final = dict(model.named_parameters())
    ref = tiny_model("llama")
    torch.manual_seed(0 * 1_000_003 + 0)
    d1 = se.edit(ref, byte_tok, cases[0].request, hp).deltas
    after_one = {n: p.detach().clone() for n, p in ref.named_parameters()}
    torch.manual_seed(1)
    d2_seq = se.edit(ref, byte_tok, cases[1].request, hp).deltas
    fresh = tiny_model("llama")
    torch.manual_seed(1)
    d2_unedited = se.edit(fresh, byte_tok, cases[1].request, hp).deltas
    assert d1 and d2_seq
    assert not torch.allclose(d2_seq[0].canonical(), d2_unedited[0].canonical(), atol=1e-7)
    for name, p in ref.named_parameters():
        assert torch.equal(final[name], p), name
    changed = [n for n in w0 if not torch.equal(w0[n], after_one[n])]
    assert changed and all(not torch.equal(final[n], after_one[n]) for n in changed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["n_edits"] == 2


def test_checkpoints_score_against_the_unedited_model_and_true_objects(byte_tok, tmp_path):
    recs = _records(3) + [easyedit_record(99)]
    path = write(tmp_path, recs)
    cases = bdata.load_counterfact(path)
    model = tiny_model("llama")
    base = tiny_model("llama")
    run_dir = _run(model, byte_tok, path, tmp_path / "out", total=4, batch_edits=3, eval_at=[2],
                   wikitext=_wiki(tmp_path))
    ck2 = json.loads((run_dir / "checkpoints" / "ckpt_2.json").read_text())
    ck4 = json.loads((run_dir / "checkpoints" / "ckpt_4.json").read_text())
    assert ck2["n_edits"] == 3 and ck4["n_edits"] == 4  # B = 3 does not divide T = 4: batches of 3 and 1
    batches = json.loads((run_dir / "summary.json").read_text())["batches"]
    assert [b["n"] for b in batches] == [3, 1]
    # each batch keeps what the algorithm decided per request (the layer a lifelong edit went to, its push, ...)
    assert [len(b["info"]) for b in batches] == [3, 1] and all("skipped" in i for b in batches for i in b["info"])

    def values(m, cs):
        return [
            record_values(metrics_from_scores(s.scores(s.logits(m)))) for s in (CaseScorer(byte_tok, c) for c in cs)
        ]

    unedited, final = values(base, cases), values(model, cases)
    for name in ("NS", "neighborhood_top1", "ES", "efficacy_top1"):
        want_u = 100 * sum(v[name] for v in unedited) / 4
        want_f = 100 * sum(v[name] for v in final) / 4
        assert ck4["unedited_metrics"][name]["mean"] == pytest.approx(want_u, abs=1e-9)
        assert ck4["metrics"][name]["mean"] == pytest.approx(want_f, abs=1e-9)
    # the unedited pass swaps the original values back in: the model ends as edited, params unchanged objects
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    assert ck4["unedited_wikitext_ppl"] > 1 and ck4["wikitext_ppl"] > 1
    # summarize: the run's row is labelled with T and B, beside its unedited rows and published sequential rows
    from shift_edit.cli import main

    assert main(["summarize", str(run_dir), "--out", str(tmp_path / "sum"),
                 "--reference", str(REPO / "eval/reference/alphaedit_table1_sequential.json")]) == 0
    rows = json.loads((tmp_path / "sum" / "summary.json").read_text())["rows"]
    labels = [r["label"] for r in rows]
    assert "sequential T=4, B=3" in labels[0] and labels[1].startswith("unedited (tiny-llama, the same 4 records)")
    assert any(lb.startswith("published (AlphaEdit, GPT2-XL, T=2000, B=100") for lb in labels)
    curves = (tmp_path / "sum" / "curves.csv").read_text().splitlines()
    assert len(curves) == 3 and curves[0].startswith("run,alg,B,n_edits")
    assert all((tmp_path / "sum" / f).is_file() for f in ("retention.png", "neighborhood.png", "paraphrase.png",
                                                          "perplexity.png"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert ck4["norms"][name]["delta_fro"] == pytest.approx(
        float((model.get_parameter(name) - base.get_parameter(name)).detach().norm()), rel=1e-5)


def test_bad_sequential_input_is_one_line_exit_2(tmp_path, capsys):
    from shift_edit.cli import main

    path = write(tmp_path, _records(3))
    base = ["bench", "--model", "no-such-model", "--alg", "SHIFT",
            "--hparams", str(REPO / "hparams/SHIFT/smollm2-135m.yaml"), "--data", str(path), "--out",
            str(tmp_path / "o")]
    for extra, msg in ((["--sequential", "0"], "--sequential must be >= 1"),
                       (["--sequential", "5"], "needs 5 records, the selection has 3"),
                       (["--sequential", "3", "--eval-at", "4"], "between 1 and T=3"),
                       (["--sequential", "3", "--batch-edits", "0"], "--batch-edits must be >= 1"),
                       (["--batch-edits", "2"], "need --sequential")):
        code = main(base + extra)
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (extra, err)
    assert not (tmp_path / "o").exists()  # nothing written


def _save_tiny(folder: Path) -> None:
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def _final(run_dir: Path) -> list[dict]:
    cks = json.loads((run_dir / "summary.json").read_text())["checkpoints"]
    return [{k: c[k] for k in ("n_edits", "metrics", "unedited_metrics", "wikitext_ppl", "norms")} for c in cks]


def test_resume_after_sigkill_gives_the_same_numbers(tmp_path):
    """A run killed (SIGKILL) after some edits continues from its saved state; the final numbers
    equal an uninterrupted run's."""
    model_dir = tmp_path / "tiny"
    _save_tiny(model_dir)
    path = write(tmp_path, _records(12))
    hp = tmp_path / "ft.yaml"
    hp.write_text("alg_name: FT\nlayers: [1]\nsteps: 4\nlr: 0.01\nskip_if_predicted: false\nmax_relative_norm: null\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [sys.executable, "-m", "shift_edit", "bench", "--model", str(model_dir), "--alg", "FT", "--hparams",
                str(hp),
                "--data", str(path), "--out", str(out), "--sequential", "12", "--batch-edits", "1", "--eval-at", "3,6",
                "--wikitext", _wiki(tmp_path), "--ppl-lines", "2", "--save-every", "1", "--no-progress"]

    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = None
    deadline = time.time() + 240
    while time.time() < deadline:
        states = list((tmp_path / "killed").glob("FT/seq_*/state/state.json"))
        if states:
            n = json.loads(states[0].read_text())["state"]["n_edits"]
            if n >= 7:
                state = states[0]
                break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["state"]["n_edits"]
    assert 7 <= killed_at < 12
    run_dir = state.parent.parent
    assert not json.loads((run_dir / "summary.json").read_text())["finished"]
    r = subprocess.run(cmd(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run(cmd(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    (whole,) = list((tmp_path / "whole").glob("FT/seq_*"))
    assert json.loads((run_dir / "summary.json").read_text())["finished"]
    assert _final(run_dir) == _final(whole)


def test_a_refused_batch_is_recorded_and_the_run_goes_on(byte_tok, tmp_path):
    """The edit guard's refusal does not end a sequential run: the batch is not applied, its records
    are scored (they do not hold) and marked, and the later batches are edited."""
    path = write(tmp_path, _records(3))
    model = tiny_model("llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    refusing = se.FTHyperParams(**{**FT, "max_relative_norm": 1e-12})
    run_dir = _run(model, byte_tok, path, tmp_path / "out", total=3, hparams=refusing, ppl=False)
    ck = json.loads((run_dir / "checkpoints" / "ckpt_3.json").read_text())
    assert ck["refused_edits"] == 3 and all(r["refused"] for r in ck["records"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and all("max_relative_norm" in b["refused"] for b in summary["batches"])
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())
    accepted = _run(tiny_model("llama"), byte_tok, path, tmp_path / "out2", total=3, ppl=False)
    ck_ok = json.loads((accepted / "checkpoints" / "ckpt_3.json").read_text())
    assert "refused_edits" not in ck_ok and not any("refused" in r for r in ck_ok["records"])


def test_runs_sharing_algorithm_and_batch_size_get_their_own_curve():
    from shift_edit.bench.seq_summary import run_names

    runs = [("SHIFT", 1, "1000", " L26"), ("SHIFT_PLUS", 1, "100", " L23 margin 2"),
            ("SHIFT_PLUS", 1, "300 of 1000", " L23 margin 0.25"), ("AlphaEdit", 100, "1000", " L2,3")]
    assert run_names(runs) == ["SHIFT B=1", "SHIFT_PLUS L23 margin 2 T=100 B=1",
                               "SHIFT_PLUS L23 margin 0.25 T=300 of 1000 B=1", "AlphaEdit B=100"]
    same = [("SHIFT_NEURON", 1, "1000", " L22"), ("SHIFT_NEURON", 1, "1000", " L22")]  # settings the tag omits
    assert run_names(same) == ["SHIFT_NEURON L22 T=1000 B=1 (1)", "SHIFT_NEURON L22 T=1000 B=1 (2)"]


def test_hparams_tag_tells_shift_neuron_variants_apart():
    from shift_edit.core.registry import run_tag

    base = {"layers": [22, 23], "margin": 1.0, "neurons_per_layer": 225, "max_generic_fires": 30, "try_layers": 1}
    assert run_tag("SHIFT_NEURON", base) == " L22,23 margin 1 x225 screen 30"
    assert run_tag("SHIFT_NEURON", {**base, "try_layers": 5,
                                    "neurons_per_layer": 300}) == " L22,23 margin 1 x300 screen 30 try 5"
