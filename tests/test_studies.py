"""The minimum-lr search, linearity of single-step deltas, resumable study files, perplexity."""

import json
import math

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.studies import layer_sweep, min_lr
from shift_edit.studies.common import STEP_FIELD, scaled, temporarily_applied, unit_deltas, unit_hparams
from shift_edit.studies.perplexity import load_wikitext_lines, protocol_text, wikitext_perplexity
from shift_edit.studies.search import find_min_lr

RECORD = {"case_id": 7, "requested_rewrite": {"prompt": "{} plays for", "subject": "Messi",
                                              "target_new": {"str": "Paris"}, "target_true": {"str": "Barca"}},
          "paraphrase_prompts": ["Messi is a player of", "Lionel Messi plays for"],
          "neighborhood_prompts": ["Xavi plays for", "Iniesta plays for"]}


@pytest.mark.parametrize("threshold", [3.7e-6, 0.01234, 1.0, 5.5, 8.9e4])
@pytest.mark.parametrize("start", [1e-5, 1.0, 1e3])
def test_bisection_finds_a_known_threshold(threshold, start):
    calls = []
    res = find_min_lr(lambda lr: calls.append(lr) or lr >= threshold, start=start, rel_tol=1e-3)
    assert res.found and res.lr >= threshold and res.lr / threshold <= 1 + 1e-3
    assert res.below < threshold and res.evals == len(calls)


def test_search_reports_not_found_and_always_works():
    never = find_min_lr(lambda lr: False, start=1.0, max_lr=1e3)
    assert not never.found and never.below == 1e3 and never.evals == 4
    always = find_min_lr(lambda lr: True, start=1.0, min_lr=1e-3)
    assert always.lr == pytest.approx(1e-3) and always.below is None


@pytest.mark.parametrize("alg", sorted(STEP_FIELD))
def test_single_step_deltas_are_linear_in_the_step(alg, byte_tok):
    model = tiny_model("llama")
    req = se.make_request(RECORD)
    one = unit_deltas(model, byte_tok, req, unit_hparams(alg, 1))
    hp = unit_hparams(alg, 1).replace(**{STEP_FIELD[alg]: 0.37})
    direct = se.get_algorithm(alg).compute(model, byte_tok, [req], hp).deltas
    for a, b in zip(scaled(one, 0.37), direct):
        torch.testing.assert_close(a.canonical(), b.canonical(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("arch, alg", [("llama", "SHIFT"), ("gpt2", "SHIFT"), ("llama", "SGD")])
def test_min_lr_cell_is_the_threshold_and_model_is_restored(byte_tok, arch, alg):
    """The search re-runs only the blocks from the edited one; checked here with full passes."""
    model = tiny_model(arch)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cell = min_lr.min_lr_for(model, byte_tok, RECORD, alg, 2, rel_tol=1e-3)
    for n, p in model.state_dict().items():
        assert torch.equal(base[n], p), n
    assert cell["min_lr"] is not None
    req = se.make_request(RECORD)
    p_ids = se.core.requests.encode_prompt(byte_tok, req.text)
    t_ids = se.core.requests.encode_target(byte_tok, req.text, req.target_new)
    unit = unit_deltas(model, byte_tok, req, unit_hparams(alg, 2))
    with temporarily_applied(model, scaled(unit, cell["min_lr"])):
        assert min_lr.is_top1(model, byte_tok, p_ids, t_ids, "first")
    with temporarily_applied(model, scaled(unit, cell["below"])):
        assert not min_lr.is_top1(model, byte_tok, p_ids, t_ids, "first")


def test_study_files_resume_and_summaries(byte_tok, tmp_path):
    model = tiny_model("gpt2")
    recs = [RECORD, {**RECORD, "case_id": 8}]
    ppl = lambda m: wikitext_perplexity(m, byte_tok, ["a short line of text for the test"])  # noqa: E731
    rows = min_lr.run_min_lr_study(model, byte_tok, recs, algs=["SHIFT", "SGD"], layers=[0, 2], out_dir=tmp_path,
                                   ppl_fn=ppl, ppl_records=1)
    assert len(rows) == 8 and all("ppl" in r for r in rows if r["case_id"] == 7 and r["min_lr"])
    first = json.loads((tmp_path / "records" / "7.json").read_text())
    again = min_lr.run_min_lr_study(model, byte_tok, recs, algs=["SHIFT", "SGD"], layers=[0, 2], out_dir=tmp_path,
                                    ppl_fn=ppl, ppl_records=1)
    assert again == rows and json.loads((tmp_path / "records" / "7.json").read_text()) == first
    doc = min_lr.write_outputs(rows, tmp_path, model, {"criterion": "first"}, None)
    assert {(s["alg"], s["layer"]) for s in doc["summary"]} == {(a, x) for a in ("SHIFT", "SGD") for x in (0, 2)}
    assert (tmp_path / "min_lr.png").stat().st_size > 0 and (tmp_path / "summary.csv").read_text().startswith("alg,")
    sweep_dir = tmp_path / "sweep"
    srows = layer_sweep.run_layer_sweep(
        model, byte_tok, recs, layers=[0, 1], settings=[("raw", 5.0), ("normalized", 50.0)], out_dir=sweep_dir
    )
    assert len(srows) == 2 * (4 + 1)
    assert all(0 <= r[m] <= 1 for r in srows for m in ("efficacy", "paraphrase", "neighborhood"))
    sdoc = layer_sweep.write_outputs(srows, sweep_dir, model, {}, None)
    assert sdoc["metric_family"].startswith("strict top-1") and (sweep_dir / "layer_sweep.png").is_file()


def test_perplexity_matches_a_hand_computation(byte_tok, tmp_path):
    model = tiny_model("llama")
    lines = ["one line that is long enough to count", "another line, also long enough here"]
    f = tmp_path / "w.raw"
    f.write_text(" = Title = \n\n short\n" + "\n".join(lines) + "\n")
    assert load_wikitext_lines(f, n=5) == lines
    expected = []
    for line in lines:
        ids = torch.tensor([byte_tok(line).input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected.append(math.exp(float(-logp.gather(1, ids[0, 1:, None]).mean())))
    got = wikitext_perplexity(model, byte_tok, lines, batch_size=2)
    assert got == pytest.approx(sum(expected) / 2, rel=1e-4)
    # a truncated probe measures something else, and its protocol text (the label `shift-edit sweep`
    # writes as ppl_protocol) names the line count and the truncation
    short = wikitext_perplexity(model, byte_tok, lines, max_tokens=8)
    assert short != pytest.approx(got)
    assert "first 10 lines" in protocol_text(10, 64) and "truncated to 64 tokens" in protocol_text(10, 64)


def test_sweep_cli_rejects_bad_options_in_one_line(capsys):
    from shift_edit.cli import main

    assert main(["sweep", "--model", "x", "--study", "min-lr", "--out", "o", "--algs", "FT"]) == 2
    assert "not supported by the min-lr study" in capsys.readouterr().err
    assert main(["sweep", "--model", "x", "--study", "layer-sweep", "--out", "o"]) == 2
    assert "--eta-raw" in capsys.readouterr().err
    assert main(["sweep", "--model", "x", "--study", "min-lr", "--out", "o", "--ppl-max-tokens", "0"]) == 2
    assert "--ppl-max-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_sweep_cells_equal_full_passes(byte_tok, tmp_path, arch):
    """The sweep re-runs only the blocks from the edited layer; every cell must equal the
    metrics of a plain full forward pass of the edited model."""
    from shift_edit.algorithms.shift.shift import ShiftHyperParams

    model = tiny_model(arch)
    recs = [RECORD, {**RECORD, "case_id": 8, "requested_rewrite": {**RECORD["requested_rewrite"], "subject": "Xavi"}}]
    rows = layer_sweep.run_layer_sweep(model, byte_tok, recs, layers=[0, 1, 2], settings=[("normalized", 40.0)],
                                       out_dir=tmp_path)
    cells = [r for r in rows if r["layer"] >= 0]
    assert len(cells) == 6
    for r in cells:
        rec = next(x for x in recs if x["case_id"] == r["case_id"])
        res = se.edit(
            model,
            byte_tok,
            rec,
            ShiftHyperParams(layers=[r["layer"]], eta=40.0, eta_scaling="normalized", skip_if_predicted=False),
            force=True,
        )
        try:
            full = layer_sweep.top1_metrics(model, byte_tok, rec)
        finally:
            res.undo()
        assert {k: r[k] for k in full} == full, r


def test_min_lr_study_adds_perplexity_to_searched_records_without_searching_again(byte_tok, tmp_path, monkeypatch):
    model = tiny_model("llama")
    recs = [RECORD, {**RECORD, "case_id": 8}]
    kw = dict(algs=["SHIFT", "SGD"], layers=[0, 2], out_dir=tmp_path)
    plain = min_lr.run_min_lr_study(model, byte_tok, recs, **kw)
    assert not any("ppl" in r for r in plain)
    searched = []
    real = min_lr.min_lr_for
    monkeypatch.setattr(min_lr, "min_lr_for", lambda *a, **k: searched.append(1) or real(*a, **k))
    ppl = lambda m: wikitext_perplexity(m, byte_tok, ["a short line of text for the test"], max_tokens=8)  # noqa: E731
    tag = {"lines": 1, "max_tokens": 8}
    rows = min_lr.run_min_lr_study(model, byte_tok, recs, ppl_fn=ppl, ppl_records=1, ppl_protocol=tag, **kw)
    assert searched == []  # the minimum steps were reused
    assert [r["min_lr"] for r in rows] == [r["min_lr"] for r in plain]
    for r in rows:
        assert ("ppl" in r) == (r["case_id"] == 7 and r["min_lr"] is not None)
    # the stored perplexity is the model edited at that step (checked for one cell), and the model is restored
    cell = next(r for r in rows if "ppl" in r)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert min_lr.ppl_at(model, byte_tok, RECORD, cell["alg"], cell["layer"], cell["min_lr"],
                         ppl) == pytest.approx(cell["ppl"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ppl(model) != pytest.approx(cell["ppl"])
    # same ppl protocol again: nothing recomputed; another protocol: perplexity measured again
    calls = []
    counting = lambda m: calls.append(1) or ppl(m)  # noqa: E731
    again = min_lr.run_min_lr_study(model, byte_tok, recs, ppl_fn=counting, ppl_records=1, ppl_protocol=tag, **kw)
    assert again == rows and calls == []
    min_lr.run_min_lr_study(model, byte_tok, recs, ppl_fn=counting, ppl_records=1,
                            ppl_protocol={"lines": 1, "max_tokens": 4}, **kw)
    assert len(calls) == sum(1 for r in rows if r["case_id"] == 7 and r["min_lr"] is not None) and searched == []


def test_ppl_summary_and_off_scale_points_drawn_at_the_cap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shift_edit.bench.plots import plot_ppl
    from shift_edit.studies.common import ppl_stats

    assert ppl_stats([]) == {"ppl_n": 0, "ppl_mean": None, "ppl_median": None}
    assert ppl_stats([74.0, 80.0, float("inf")]) == {"ppl_n": 3, "ppl_mean": float("inf"), "ppl_median": 80.0}
    fig, ax = plt.subplots()
    plot_ppl(ax, [0, 1, 2], [80.0, float("inf"), 1e30], "normalized 60", base_ppl=74.0)
    line, marks = ax.get_lines()
    assert list(line.get_ydata()) == [80.0, 7400.0, 7400.0]  # a broken model's value sits at 100x unedited
    assert list(marks.get_xdata()) == [1, 2] and marks.get_marker() == "^"
    assert [t.get_text() for t in ax.texts] == ["inf", "1e+30"]
    plt.close(fig)


def test_min_lr_outputs_when_no_record_reaches_top1(tmp_path):
    """Every search ends 'below max lr' (no minimum found): the summary and the plot are still written
    (the plot used to fail on an empty log axis)."""
    model = tiny_model("gpt2")
    rows = [{"case_id": 7, "alg": a, "layer": layer, "min_lr": None, "below": 1e5, "evals": 11,
             "unit_delta_norm": 1.0} for a in ("SHIFT", "SGD") for layer in (0, 2)]
    doc = min_lr.write_outputs(rows, tmp_path, model, {"criterion": "first"}, None)
    assert all(s["median_min_lr"] is None for s in doc["summary"])
    assert (tmp_path / "min_lr.png").stat().st_size > 0
