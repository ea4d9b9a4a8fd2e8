"""Backward Lens: decomposition identity, ranks, Logit Lens, views and the CLI (tiny models)."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from _tiny import tiny_model

from shift_edit.cli import main
from shift_edit.core.requests import make_requests
from shift_edit.lens import (
    LogitLens,
    capture_gradients,
    check_decomposition,
    factored_rank,
    gradient_neurons,
    lens_grid,
    numerical_rank,
    rank_table,
    target_ranks,
    token_segments,
)
from shift_edit.lens.stats import aggregate_csv, lens_stats
from shift_edit.model.architectures import ModelAdapter

ARCHS = ["gpt2", "llama", "opt", "gpt_neox", "phi3"]
GENERIC = "abcdefghij"  # ten distinct byte tokens: generic inputs, n = 10 < d_model = 32


@pytest.fixture(scope="module")
def captures(byte_tok):
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        out[arch] = (model, capture_gradients(model, byte_tok, GENERIC, " xyz"))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_is_sum_of_outer_products(captures, arch):
    model, cap = captures[arch]
    checks = check_decomposition(cap)
    adapter = ModelAdapter(model)
    assert len(checks) == adapter.n_layers * (1 + len(adapter.ff1_templates))
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert max(c.relative_error for c in checks) < 1e-5
    assert all(c.grad_norm > 0 for c in checks)
    layouts = {c.layout for c in checks}
    assert layouts == ({"in_out"} if arch == "gpt2" else {"out_in"})
    for m in cap.matrices():  # x_i and δ_i are per position, also for OPT's flattened MLP
        assert m.x.shape[0] == cap.n == m.delta.shape[0]
        assert m.canonical_grad.shape == (m.delta.shape[1], m.x.shape[1])


def test_decomposition_check_detects_a_wrong_gradient(byte_tok):
    cap = capture_gradients(tiny_model("gpt2"), byte_tok, GENERIC, " xyz")
    m = cap.layers[0].ff2
    m.grad[0, 0] += 10 * float(m.grad.abs().max())
    bad = [c for c in check_decomposition(cap) if not c.ok]
    assert [c.name for c in bad] == [m.name]
    assert bad[0].relative_error > 0.1


def test_gated_mlp_shares_ff1_input(captures):
    _, cap = captures["llama"]
    for lc in cap.layers:
        gate, up = lc.ff1
        assert gate.name.endswith("gate_proj") and up.name.endswith("up_proj")
        assert gate.x is up.x is lc.ff1_x
        assert not torch.equal(gate.delta, up.delta)
        expect = (gate.delta.double().norm(dim=-1) ** 2 + up.delta.double().norm(dim=-1) ** 2).sqrt()
        assert torch.allclose(lc.ff1_delta_norm().double(), expect, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_rank_equals_prompt_length_for_generic_inputs(captures, byte_tok, arch):
    _, cap = captures[arch]
    assert cap.n == len(GENERIC)
    rows = rank_table(cap)
    assert rows == rank_table(cap, factored=True)  # factored singular values agree with the SVD
    for row in rows:
        if row["layer"] < cap.layers[-1].layer:
            assert row["rank"] == cap.n, row


@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_gradients_are_rank_one(captures, byte_tok, arch):
    _, cap = captures[arch]
    last = cap.layers[-1]
    for m in (*last.ff1, last.ff2):
        assert numerical_rank(m.grad) == 1
        assert factored_rank(m) == 1
        assert torch.count_nonzero(m.delta[:-1]) == 0  # only the last position's δ is nonzero
        assert m.delta[-1].norm() > 0


def test_capture_leaves_the_model_alone(byte_tok):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    capture_gradients(model, byte_tok, GENERIC, " q")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad is False
    assert model.model.layers[1].mlp.down_proj.weight.requires_grad is True


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_logit_lens_of_a_decoding_row_ranks_its_token_first(arch):
    model = tiny_model(arch)
    lens = LogitLens(model)
    rows = lens.decoding[:256]
    sample = range(0, 256, 5)
    cosine = LogitLens(model, apply_final_norm=False)  # normalised without the norm: exact cosine ranking
    assert all(int(cosine.rank(rows[t], t, normalized=True)) == 1 for t in sample)
    ranks = torch.stack([lens.rank(rows[t], t, normalized=True) for t in sample])
    assert torch.all(ranks == 1), ranks
    plain = torch.stack([lens.rank(rows[t], t) for t in sample])  # LayerNorm's centring may cost a place
    assert float((plain == 1).float().mean()) >= 0.9 and int(plain.max()) <= 3, plain
    top = lens.tokens(rows[65], k=3)
    assert top[0][0] == 65 and top[0][1] > top[1][1]
    bottom = lens.tokens(rows[65], k=3, order="bottom")
    assert bottom[0][1] <= bottom[1][1] and bottom[0][0] != 65


def test_logit_lens_of_a_decoding_row_smollm2(smollm2):
    model, tok = smollm2
    lens = LogitLens(model)
    ids = tok(" Paris Rome football the", add_special_tokens=False).input_ids
    for t in ids:
        assert int(lens.rank(lens.decoding[t], t, normalized=True)) == 1


def test_grids_target_ranks_and_neurons(byte_tok):
    model = tiny_model("llama")
    cap = capture_gradients(model, byte_tok, GENERIC, " xyz")
    lens = LogitLens(model)
    for kind in ("ff1", "ff2"):
        grid = lens_grid(cap, lens, byte_tok, kind, k=3)
        assert len(grid.cells) == 3 and all(len(row) == cap.n for row in grid.cells)
        assert grid.order == ("top" if kind == "ff1" else "bottom")
        cell = grid.cells[1][4]
        assert len(cell["k_tokens"]) == 3 and cell["delta_norm"] > 0
        vec = cap.layers[1].ff1_x[4] if kind == "ff1" else cap.layers[1].ff2.delta[4]
        assert cell["k_ids"][0] == lens.tokens(vec, 1, order=grid.order)[0][0]
        assert len(list(csv.reader(io.StringIO(grid.to_csv())))) == 1 + 3 * cap.n
    ranks = target_ranks(cap, lens)
    logits = lens.logits(cap.layers[2].ff2.delta[-1])
    assert ranks[2]["target_rank"] == int((logits < logits[cap.target_id]).sum()) + 1
    view = gradient_neurons(cap, lens, byte_tok, 1, top=5, k=2)
    norms = [r["norm"] for r in view["neurons"]]
    assert norms == sorted(norms, reverse=True) and len(norms) == 5
    g = cap.layers[1].ff2.canonical_grad
    assert abs(norms[0] - float(g.norm(dim=0).max())) < 1e-5 * norms[0]
    assert sum(gr["share"] for gr in view["groups"]) == pytest.approx(1.0, abs=1e-6)  # d_ff = 48 < 1000


def test_token_segments(byte_tok):
    labels = token_segments(byte_tok, "The Eiffel is", "Eiffel")
    assert labels == ["other"] * 4 + ["subject"] * 5 + ["last_subject", "other", "other", "last"]
    assert token_segments(byte_tok, "abc", None) == ["other", "other", "last"]


RECORDS = [
    {"case_id": i, "requested_rewrite": {"prompt": p, "subject": s, "target_new": {"str": n},
                                         "target_true": {"str": t}}}
    for i, (p, s, n, t) in enumerate([("{} lives in", "Ann", "Oslo", "Rome"),
                                      ("The pet of {} is a", "Bo", "cat", "dog"),
                                      ("{} speaks", "Cy Dee", "Tamil", "Greek")])
]


def test_lens_stats_aggregates(byte_tok):
    model = tiny_model("gpt2")
    res = lens_stats(model, byte_tok, make_requests(RECORDS), progress=False)
    agg = res["aggregate"]
    assert agg["n_records"] == 3 and agg["layer_index_normalized"] == [0.0, 0.5, 1.0]
    assert agg["last_layer_ff2_rank_one_share"] == 1.0
    assert agg["rank_equals_n_share"]["ff2"][-1] == 0.0
    for s in ("subject", "last_subject", "other", "last"):
        assert agg["segments"]["share_mean"][s][-1] == (1.0 if s == "last" else 0.0)
    med = agg["ranks_normalized"]["target_rank_plain"]["median"]
    assert len(med) == 3 and all(0 <= v <= 1 for v in med)
    assert aggregate_csv(agg).count("\n") == 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tok):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_model("gpt2").save_pretrained(path)
    byte_tok.save_pretrained(path)
    return path


def test_cli_lens_writes_files(tiny_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    rc = main(["lens", "--model", str(tiny_dir), "--prompt", "{} plays for", "--subject", "Messi",
               "--target", "Paris", "--out", str(out), "--top-k", "2"])
    assert rc == 0, capsys.readouterr()
    for stem in ("ff1_plain", "ff2_plain", "ff1_normalized", "ff2_normalized"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((out / f"{stem}.json").read_text())["kind"] == stem[:3]
        assert (out / f"{stem}.csv").read_text().startswith("kind,")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decomposition_ok"] is True and summary["n"] == len("Messi plays for")
    assert summary["segments"][4] == "last_subject" and summary["segments"][-1] == "last"
    assert [r["rank"] for r in summary["ranks"] if r["layer"] == 2] == [1, 1]
    assert summary["provenance"]["model"]["fingerprint"]
    for name in ("neurons.csv", "neuron_groups.csv", "ranks.csv", "target_ranks.csv"):
        assert (out / name).stat().st_size > 0
    assert "decomposition" in capsys.readouterr().out


def test_cli_lens_stats_writes_files(tiny_dir, tmp_path, capsys):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "stats"
    rc = main(["lens-stats", "--model", str(tiny_dir), "--data", str(data), "--limit", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["aggregate"]["n_records"] == 2 and len(stats["records"]) == 2
    for name in ("rank_share.png", "target_rank.png", "segments.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "stats.csv").read_text().startswith("layer,")


@pytest.mark.parametrize("extra", [
    ["lens", "--prompt", "Messi plays for", "--subject", "Ronaldo", "--target", "Paris"],
    ["lens", "--prompt", "{} plays for", "--target", "Paris"],
    ["lens", "--prompt", "x", "--target", "  "],
    ["lens", "--prompt", "x", "--target", "y", "--top-k", "0"],
    ["lens", "--prompt", "x", "--target", "y", "--neuron-layer", "7"],
    ["lens-stats", "--data", "/nonexistent.json"],
    ["lens-stats", "--data", "BADJSON"],
    ["lens-stats", "--data", "RECORDS", "--limit", "0"],
    ["lens", "--prompt", "x"],  # missing --target: argparse error
])
def test_cli_bad_input_exits_2(tiny_dir, tmp_path, capsys, extra):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    good = tmp_path / "records.json"
    good.write_text(json.dumps(RECORDS))
    extra = [str(bad) if a == "BADJSON" else str(good) if a == "RECORDS" else a for a in extra]
    with pytest.raises(SystemExit) if extra == ["lens", "--prompt", "x"] else _nullcontext() as exc:
        rc = main([extra[0], "--model", str(tiny_dir), *extra[1:], "--out", str(tmp_path / "o")])
    code = exc.value.code if exc is not None and hasattr(exc, "value") else rc
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_cli_refuses_non_empty_out(tiny_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["lens", "--model", str(tiny_dir), "--prompt", "ab", "--target", "c", "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_half_precision_and_partial_weight_gradients(byte_tok):
    model = tiny_model("llama").to(torch.bfloat16)
    cap = capture_gradients(model, byte_tok, GENERIC, " xyz", weight_grads=[1, -1])
    assert [m.grad is not None for m in cap.matrices()] == [False] * 3 + [True] * 6
    checks = check_decomposition(cap)
    assert len(checks) == 6 and all(c.ok for c in checks), checks
    assert all(m.dtype == torch.bfloat16 for m in cap.matrices())
    assert [r["rank"] for r in rank_table(cap) if r["layer"] == 2] == [1, 1, 1]
    with pytest.raises(ValueError):
        cap.layers[0].ff2.canonical_grad


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_captured_gradient_matches_plain_backward(byte_tok, arch):
    model = tiny_model(arch)
    cap = capture_gradients(model, byte_tok, GENERIC, "xyz")  # a leading space is added
    assert byte_tok.decode([cap.target_id]) == " "
    ids = torch.tensor([byte_tok(GENERIC).input_ids])
    loss = -torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)[cap.target_id]
    loss.backward()
    adapter = ModelAdapter(model)
    for lc in cap.layers:
        assert torch.allclose(lc.ff2.grad, adapter.ff2(lc.layer).weight.grad, rtol=1e-5, atol=1e-8)
        assert torch.allclose(lc.ff1[0].grad, adapter.ff1(lc.layer)[0].weight.grad, rtol=1e-5, atol=1e-8)
    assert cap.loss == pytest.approx(float(loss.detach()), rel=1e-6)
