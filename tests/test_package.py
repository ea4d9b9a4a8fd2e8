"""Issue 18: shipped hparams and data found without the checkout, honest edits, clear messages."""

from __future__ import annotations

import hashlib
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.cli import main
from shift_edit.core.errors import ShiftEditError
from shift_edit.core.requests import make_request, with_leading_space
from shift_edit.core.shipped_hparams import hparams_model_mismatch, model_stem, shipped_hparams, shipped_hparams_index
from shift_edit.core.step_search import search_step
from shift_edit.files import data_files as sdata

REPO = Path(__file__).resolve().parents[1]
PICASSO = ["--model", "smollm2-135m", "--prompt", "{} is a famous painter from", "--subject", "Pablo Picasso",
           "--target", "Canada"]


# --- shipped hparams ---------------------------------------------------------------------------
def test_every_repo_hparams_file_is_shipped_through_the_package():
    on_disk = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in (REPO / "hparams").iterdir() if d.is_dir()}
    assert shipped_hparams_index() == {k: v for k, v in sorted(on_disk.items()) if v}
    for alg, stems in on_disk.items():
        for stem in stems:
            p = shipped_hparams(alg, stem)
            assert p is not None and p.read_text() == (REPO / "hparams" / alg / f"{stem}.yaml").read_text()
            assert type(se.load_hparams(p)).ALG_NAME == alg


def test_models_lists_shipped_hparams(capsys):
    assert main(["models"]) == 0
    assert "shipped hparams: gpt-j-6b, gpt2-medium, gpt2-xl, llama-2-7b, smollm2-135m" in capsys.readouterr().out


def test_hparams_lookup_by_hub_id_and_from_any_folder(tmp_path, monkeypatch):
    assert model_stem("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert model_stem("meta-llama/Llama-2-7b-hf") == "llama-2-7b"
    assert shipped_hparams("SHIFT", "/some/where/gpt2-xl/") is not None
    assert shipped_hparams("SHIFT", "no-such-model") is None
    monkeypatch.chdir(tmp_path)  # EasyEdit-style relative names resolve to the shipped files
    hp = se.ShiftHyperParams.from_hparams("hparams/SHIFT/smollm2-135m")
    assert hp.model_name and hp.layers


def test_step_field_is_declared_by_the_hparams_class():
    def step_field(cls):
        return se.get_algorithm(cls.ALG_NAME).step_field

    assert step_field(se.ShiftHyperParams) == "eta"
    assert step_field(se.SGDHyperParams) == step_field(se.AdamHyperParams) == step_field(se.FTHyperParams) == "lr"
    assert step_field(se.ROMEHyperParams) is None and step_field(se.MEMITHyperParams) is None


# --- data resolution ---------------------------------------------------------------------------
def test_data_resolution_order(tmp_path, monkeypatch):
    env, cache = tmp_path / "env", tmp_path / "cache"
    rel = sdata.DATA_FILES["wikitext"].relpath[0]
    for root in (env, cache / "data"):
        (root / rel).parent.mkdir(parents=True)
        (root / rel).write_text(str(root))
    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(cache))
    monkeypatch.delenv("SHIFT_EDIT_SHARED_DATA", raising=False)
    monkeypatch.setenv("SHIFT_EDIT_DATA", str(env))
    explicit = tmp_path / "mine.raw"
    explicit.write_text("x")
    assert sdata.find_data("wikitext", explicit) == explicit
    assert sdata.find_data("wikitext") == env / rel
    monkeypatch.delenv("SHIFT_EDIT_DATA")
    assert sdata.find_data("wikitext") == cache / "data" / rel
    (cache / "data" / rel).unlink()
    assert sdata.find_data("wikitext") is None
    with pytest.raises(ShiftEditError, match="shift-edit data fetch wikitext"):
        sdata.require_data("wikitext")
    with pytest.raises(ShiftEditError, match="not found"):
        sdata.find_data("wikitext", tmp_path / "missing.raw")


def test_fetch_checks_sha256_and_converts(tmp_path, monkeypatch):
    raw = b"line one\r\nline two\r\n"
    src = tmp_path / "src.raw"
    src.write_bytes(raw)
    spec = sdata.DataFile(name="wikitext", relpath=("wt/test.raw",), description="t", url=src.as_uri(),
                          sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), post=sdata._crlf_to_lf,
                          stored_sha256=hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest())
    monkeypatch.setitem(sdata.DATA_FILES, "wikitext", spec)
    got = sdata.fetch_data("wikitext", tmp_path / "store")
    assert got == tmp_path / "store" / "wt" / "test.raw" and got.read_bytes() == b"line one\nline two\n"
    src.write_bytes(b"tampered")
    assert sdata.fetch_data("wikitext", tmp_path / "store") == got, "a good stored copy is reused, no download"
    with pytest.raises(ShiftEditError, match="sha256"):
        sdata.fetch_data("wikitext", tmp_path / "other", force=True)
    assert not any((tmp_path / "other").rglob("*")) or not any(p.is_file() for p in (tmp_path / "other").rglob("*"))


def test_data_cli_fetch_and_where(tmp_path, monkeypatch, capsys):
    payload = b'[{"case_id": 0}]'
    src = tmp_path / "cf.json"
    src.write_bytes(payload)
    monkeypatch.setitem(sdata.DATA_FILES, "counterfact", sdata.DataFile(
        name="counterfact", relpath=("counterfact.json",), description="t", url="https://example.invalid/cf.json",
        sha256=hashlib.sha256(payload).hexdigest(), size=len(payload)))
    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SHIFT_EDIT_DATA", raising=False)
    monkeypatch.delenv("SHIFT_EDIT_SHARED_DATA", raising=False)
    assert main(["data", "where", "counterfact"]) == 2
    assert "shift-edit data fetch counterfact" in capsys.readouterr().err
    assert main(["data", "fetch", "counterfact", "--url", src.as_uri()]) == 0
    assert main(["data", "where", "counterfact"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "cache" / "data" / "counterfact.json"))


def test_data_cli_help_names_every_fetchable_set():
    from shift_edit.cli import data as data_cli

    fetchable = [name for name, spec in sdata.DATA_FILES.items() if spec.url]
    assert {"counterfact", "wikitext", "zsre"} <= set(fetchable)
    assert data_cli.HELP.endswith("(" + ", ".join(fetchable) + ")")


def test_library_has_no_path_outside_itself():
    """No library module reaches for the checkout or ../shared through its own location."""
    pkg = REPO / "shift_edit"
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        assert "parents[" not in text and '"shared"' not in text, f
    # io.git_info is the one reader of __file__: it records the checkout's git state, if any
    assert [f.name for f in pkg.rglob("*.py") if "__file__" in f.read_text()] == ["io.py"]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_result_files_record_the_checkouts_commit():
    """git_info finds the checkout from the module's place in the package (it recorded nothing after the move into
    subpackages, when it looked one folder too low)."""
    from shift_edit.files.io import git_info

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert git_info()["commit"] == head and len(head) == 40


# --- requests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["Paris", " Paris", "  Paris", "Paris ", "\tParis\n"])
def test_targets_get_exactly_one_leading_space(target):
    assert with_leading_space("The capital is", target) == " Paris"
    assert make_request({"prompt": "The capital is", "target_new": target}).target_new == " Paris"
    assert with_leading_space("The capital is ", target) == "Paris"


# --- honest edits ------------------------------------------------------------------------------------
def test_outcome_before_after_and_weights_untouched(byte_tok):
    model = tiny_model("gpt2")
    req = {"prompt": "ab", "target_new": "zq"}
    hp = se.ShiftHyperParams(layers=[1], eta=1e-3, skip_if_predicted=False)
    res = se.edit(model, byte_tok, req, hp)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    summary = res.summary()
    assert len(summary) == 1 and summary.outcome is not None
    (o,) = summary.outcome
    assert o["n_tokens"] == 3 and 0 < o["prob_before"] < 1 and 0 < o["prob_after"] < 1
    assert o["prob_before"] != o["prob_after"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in edited.items()), "measuring 'before' restores exactly"
    assert "strict top-1" in str(summary)
    res.undo()
    from shift_edit.core.result import measure

    assert math.isclose(measure(model, byte_tok, res.requests)[0][1], o["prob_before"], rel_tol=1e-5)


def test_search_step_finds_a_flipping_step_and_leaves_the_model(byte_tok):
    model = tiny_model("gpt2")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    hp = se.ShiftHyperParams(layers=[1], eta=1e-4, skip_if_predicted=False)
    req = {"prompt": "abc ", "target_new": "z"}  # one byte token after a prompt ending in a space
    found = search_step(model, byte_tok, req, hp, max_doublings=30)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    assert found.found and found.field == "eta" and found.step > hp.eta
    res = se.edit(model, byte_tok, req, hp.replace(eta=found.step))
    assert res.outcome()[0].top1_after
    assert "chosen from" in found.line()
    with pytest.raises(ShiftEditError, match="step size"):
        search_step(model, byte_tok, req, se.ROMEHyperParams(layers=[1]))


def test_cli_edit_that_does_not_flip_warns_and_exits_3(smollm2, tmp_path, capsys):
    patch = tmp_path / "p.safetensors"
    assert main(["edit", *PICASSO, "--save-patch", str(patch)]) == 3
    cap = capsys.readouterr()
    assert "strict top-1 (all 1 token): no -> no" in cap.out
    assert patch.is_file(), "the outputs asked for are still written"
    warn = [line for line in cap.err.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "--until-top1" in warn[0] and "exit code 3" in warn[0]


def test_cli_until_top1_chooses_a_step_and_flips(smollm2, capsys):
    assert main(["edit", *PICASSO, "--until-top1"]) == 0
    out = capsys.readouterr().out
    assert "--until-top1: eta " in out and "chosen from 60" in out
    assert "no -> yes" in out and "after:  ' Canada'" in out


def test_help_documents_exit_code_3(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    assert "3 the edit was made" in " ".join(capsys.readouterr().out.split())


# --- messages ------------------------------------------------------------------------------------
def test_misspelt_alias_is_one_line_at_once(capsys):
    t0 = time.perf_counter()
    assert main(["edit", "--model", "smolm2-135m", "--prompt", "x", "--target", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - t0 < 5
    assert err.count("\n") == 0 and "did you mean 'smollm2-135m'" in err


def test_unknown_hub_id_offline_or_unreachable_is_one_error_without_retries(monkeypatch, tmp_path):
    from shift_edit.model import loading

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShiftEditError, match="HF_HUB_OFFLINE is set"):
        loading.check_model_name("someone/not-a-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def refuse(req, timeout=None):
        calls.append(req.full_url)
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", refuse)
    with pytest.raises(ShiftEditError, match="hub is unreachable"):
        se.load_model("someone/not-a-model")
    assert len(calls) == 1, "one request, no retries"


def test_hparams_for_another_model_are_named(byte_tok):
    hp = se.load_hparams(shipped_hparams("SHIFT", "gpt2-xl"))
    model = tiny_model("gpt2")
    model._shift_edit_name = "tiny-gpt2"
    assert hparams_model_mismatch(hp, model) == "these SHIFT hparams were written for gpt2-xl, not tiny-gpt2"
    assert hparams_model_mismatch(hp, "gpt2-xl") is None
    with pytest.raises(ShiftEditError, match=r"layer 35 is out of range.*written for gpt2-xl"):
        se.edit(model, byte_tok, {"prompt": "ab", "target_new": "c"}, hp)


def test_cli_warns_on_hparams_for_another_model(smollm2, tmp_path, capsys):
    hp = se.load_hparams(shipped_hparams("SHIFT", "smollm2-135m")).replace(model_name="gpt2-medium")
    path = tmp_path / "hp.yaml"
    hp.to_yaml(path)
    main(["edit", *PICASSO, "--hparams", str(path)])
    err = capsys.readouterr().err
    assert "warning: these SHIFT hparams were written for gpt2-medium, not smollm2-135m" in err


# --- bench messages ------------------------------------------------------------------------------
def _bench_two_runs(tmp_path, byte_tok):
    from test_bench import rome_record, write

    from shift_edit.bench import counterfact as bdata
    from shift_edit.bench.bench_config import BenchConfig
    from shift_edit.bench.runner import run_bench

    model = tiny_model("llama")
    data = write(tmp_path, [rome_record(i, subject=f"Sub{i}") for i in range(3)])
    cfg = BenchConfig(alg="NONE", hparams=None, skip_generation=True, skip_wild=True)  # one record per group

    def run(limit, out):
        return run_bench(model, byte_tok, bdata.load_counterfact(data, limit=limit), cfg, out,
                         data_info={"path": str(data), "sha256": bdata.file_sha256(data)}, model_name="tiny-llama",
                         progress=True)
    return run


def test_resumed_bench_says_how_many_cases_were_done(byte_tok, tmp_path, capsys):
    run = _bench_two_runs(tmp_path, byte_tok)
    first = run(2, tmp_path / "res")
    capsys.readouterr()
    assert run(2, tmp_path / "res") == first
    err = capsys.readouterr().err
    assert "2 of 2 cases already done, 0 to do" in err and "0case" not in err, "no empty progress bar"
    run(3, tmp_path / "res")
    assert "2 of 3 cases already done, 1 to do" in capsys.readouterr().err


def test_summarize_warns_on_different_n_and_clips_ci_bars(byte_tok, tmp_path, capsys, monkeypatch):
    run = _bench_two_runs(tmp_path, byte_tok)
    a, b = run(1, tmp_path / "a"), run(3, tmp_path / "b")
    import matplotlib.axes

    bars = []
    real = matplotlib.axes.Axes.bar
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "bar",
        lambda self, x, h, *args, **kw: bars.append((h, kw.get("yerr"))) or real(self, x, h, *args, **kw),
    )
    capsys.readouterr()
    assert main(["summarize", str(a), str(b), "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "warning: the runs have different numbers of records" in err and "--common" in err
    assert bars
    for heights, (low, high) in bars:
        for h, lo, hi in zip(heights, low, high):
            if h == h:
                assert h - lo >= 0 and h + hi <= 100


# --- adapters -----------------------------------------------------------------------------------
def test_alias_adapter_names_a_loadable_base_and_says_what_it_is(smollm2, tmp_path):
    import json

    pytest.importorskip("peft")
    from peft import AutoPeftModelForCausalLM

    model, tok = smollm2
    hp = se.load_hparams(shipped_hparams("SHIFT", "smollm2-135m"))
    res = se.edit(model, tok, {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}, hp)
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    try:
        with torch.no_grad():
            edited = model(**ids).logits[0, -1]
        se.export_lora(res, tmp_path / "ad")
    finally:
        res.undo()
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    side = json.loads((tmp_path / "ad" / "shift_edit.json").read_text())
    assert (Path(cfg["base_model_name_or_path"]) / "config.json").is_file()
    assert side["base"]["kind"] == "alias" and side["base"]["gguf_file"].endswith(".gguf")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad"))
    with torch.no_grad():
        got = peft_model(**ids).logits[0, -1]
    assert float((got - edited).abs().max()) < 1e-3


def test_hub_adapter_keeps_the_hub_id():
    from shift_edit.files.lora import resolvable_base

    assert resolvable_base("gpt2-xl") == {"kind": "hub", "base_model_name_or_path": "gpt2-xl"}


# --- lens pictures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tok):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_model("gpt2").save_pretrained(path)
    byte_tok.save_pretrained(path)
    return path


def test_lens_writes_every_picture_without_glyph_warnings(tiny_dir, tmp_path, capsys, recwarn):
    import logging

    out = tmp_path / "lens"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("matplotlib").addHandler(handler)
    try:
        rc = main(["lens", "--model", str(tiny_dir), "--prompt", "{} 中文 plays for", "--subject", "Messi",
                   "--target", "Paris", "--out", str(out), "--top-k", "2"])
    finally:
        logging.getLogger("matplotlib").removeHandler(handler)
    assert rc == 0, capsys.readouterr()
    for name in ("ranks.png", "target_ranks.png", "neurons.png", "ff1_plain.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    glyph = [str(w.message) for w in recwarn if "Glyph" in str(w.message)] + \
        [r.getMessage() for r in records if "Glyph" in r.getMessage()]
    assert glyph == []


def test_safe_text_escapes_what_the_font_cannot_draw():
    from shift_edit.lens.pictures import safe_text

    assert safe_text(" Paris") == " Paris"
    assert safe_text("\ufffd\ufffd") == "<?><?>"
    assert safe_text("\n") == "\\n"
    assert safe_text("中") == "\\u4e2d"


def test_heatmap_marks_the_subject(tmp_path, monkeypatch):
    import matplotlib.axes

    from shift_edit.lens.views import LensGrid, plot_grid

    seen = {}
    real = matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "set_xticks",
        lambda self, ticks, labels=None, **kw: seen.setdefault("labels", labels) and real(self, ticks, labels, **kw),
    )
    cell = {"token": "x", "delta_norm": 1.0, "x_norm": 1.0, "outer_norm": 1.0}
    grid = LensGrid(kind="ff2", normalized=False, order="bottom", layers=[0, 1], tokens=["Mess", "i", " plays"],
                    cells=[[cell] * 3, [cell] * 3])
    plot_grid(grid, tmp_path / "g.png", subject_positions=[0, 1], target=" Paris")
    assert seen["labels"] == ["[Mess]", "[i]", " plays"]


def test_first_time_statistics_announce_themselves_with_an_estimate(byte_tok, tmp_path, monkeypatch, caplog):
    import logging

    from shift_edit.model.covariance import layer_stats

    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus for statistics" for i in range(40)))
    model = tiny_model("gpt2")
    with caplog.at_level(logging.WARNING, logger="shift_edit.model.covariance"):
        layer_stats(model, byte_tok, [1], corpus=str(corpus), n_tokens=600, max_length=40, batch_tokens=128,
                    progress=False)
    text = caplog.text
    assert "computing second-moment statistics of layer(s) [1] over 600 tokens" in text and "once, then cached" in text
    assert "tokens/s on this machine" in text and "about" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shift_edit.model.covariance"):
        layer_stats(model, byte_tok, [1], corpus=str(corpus), n_tokens=600, max_length=40, batch_tokens=128,
                    progress=False)
    assert "computing" not in caplog.text, "a cached result is not announced"


def test_cli_hparams_that_cannot_fit_are_one_line_naming_their_model(smollm2, capsys):
    assert main(["edit", *PICASSO, "--hparams", str(shipped_hparams("SHIFT", "gpt2-xl"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layer 35 is out of range" in err and "written for gpt2-xl" in err
