"""Fuzz (issue 17): seeded random mutations of a valid patch file, a valid hparams file and a valid
CounterFact record. Each must give a correct result or one clear ShiftEditError: never another
exception type, never a model with non-finite weights or outputs, never a changed model after
an error. Tiny models, about 500 cases in all."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import yaml
from _tiny import tiny_model

import shift_edit as se
from shift_edit.bench import counterfact as bdata

REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": "Paris"}
PROBE = "Messi plays for the team of"

HPARAMS = {
    "SHIFT": "alg_name: SHIFT\nmodel_name: tiny\nlayers: [1]\neta: 0.05\neta_scaling: raw\nd_source: decoding\n"
             "target_tokens: first\nskip_if_predicted: false\nbatch_size: 4\nearly_exit: true\n",
    "SGD": "alg_name: SGD\nlayers: [1]\nmatrices: ff2\ntarget_tokens: first\ngrad_positions: all\nlr: 0.5\n"
           "skip_if_predicted: false\n",
}

RECORD = {
    "case_id": 5,
    "requested_rewrite": {"prompt": "{} plays for", "subject": "Messi", "relation_id": "P54",
                          "target_new": {"str": "Paris", "id": "Q1"}, "target_true": {"str": "Rome", "id": "Q2"}},
    "paraphrase_prompts": ["Yes. Messi plays for", "Indeed Messi is a player of"],
    "neighborhood_prompts": ["Totti plays for", "Baggio played for"],
    "generation_prompts": ["Messi is"],
}

WEIRD = [None, 0, -1, 7, 10**9, -(10**9), 1e30, -1e30, float("nan"), float("inf"), 0.5, True, False, "", " ", "x",
         "{}", "{} {}", "{x}", "{", "}", "{0}", "\n", "é" * 5, "a" * 3000, [], [1], ["a", "b"], {}, {"str": 3},
         {"str": "Rome"}, [[5, 5]], "null", "-1", "1e400"]


def _finite_model(model, tok) -> bool:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return False
    with torch.no_grad():
        return bool(torch.isfinite(model(input_ids=torch.tensor([tok(PROBE).input_ids])).logits).all())


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _unchanged(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.state_dict().items())


def _check(outcome_fn, model, tok, snap, what):
    """Run ``outcome_fn``; it returns an undo callable on success. Asserts the contract."""
    try:
        undo = outcome_fn()
    except se.ShiftEditError as exc:
        assert _unchanged(model, snap), f"{what}: model changed by a refused input ({exc})"
        return "error"
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    assert _finite_model(model, tok), f"{what}: accepted, but the model is no longer finite"
    if undo is not None:
        undo()
    assert _unchanged(model, snap), f"{what}: undo did not restore the model"
    return "ok"


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    op = rng.choice(["flip", "flip", "flip", "header", "truncate", "append", "zero"])
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if op == "flip":
        for _ in range(rng.randint(1, 40)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == "header":
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8, header_end)] = rng.randrange(32, 127)
    elif op == "truncate":
        del b[rng.randrange(len(b)):]
    elif op == "append":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        i = rng.randrange(header_end, len(b))
        b[i:i + 64] = bytes(len(b[i:i + 64]))
    return bytes(b)


def test_fuzz_patch_files(byte_tok, tmp_path):
    rng = random.Random(17)
    edited = tiny_model("gpt2")
    good = se.edit(edited, byte_tok, REQ, se.ShiftHyperParams(layers=[0, 2], eta=0.05, skip_if_predicted=False))
    path = good.save_patch(tmp_path / "good.safetensors")
    want = _snapshot(edited)
    raw = path.read_bytes()
    model = tiny_model("gpt2")
    snap = _snapshot(model)
    outcomes = {"ok": 0, "error": 0}
    for i in range(200):
        bad = tmp_path / f"m{i}.safetensors"
        bad.write_bytes(_mutate_bytes(raw, rng))

        def apply():
            result = se.apply_patch(model, bad, tok=byte_tok)
            assert all(torch.equal(p, want[n]) for n, p in model.state_dict().items()), "accepted a changed patch"
            return result.undo

        outcomes[_check(apply, model, byte_tok, snap, f"patch mutation {i}")] += 1
    assert outcomes["error"] >= 150, outcomes  # nearly every mutation is caught by the checksum


def _mutate_tree(obj, rng: random.Random):
    """A deep copy of ``obj`` with one random node deleted or replaced by a weird value."""
    obj = copy.deepcopy(obj)
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for j, v in enumerate(node):
                walk(v, path + [j])

    walk(obj, [])
    path = rng.choice(paths[1:])
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    op = rng.random()
    if op < 0.2:
        del parent[path[-1]]
    elif op < 0.4 and isinstance(parent[path[-1]], str):
        s = parent[path[-1]]
        pos = rng.randrange(len(s) + 1)
        parent[path[-1]] = s[:pos] + rng.choice(["{}", "{", "}", "{x}", "", "\x00", " ", "{{"]) + s[pos:]
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(WEIRD))
    return obj


def _mutate_yaml(text: str, rng: random.Random) -> str:
    op = rng.random()
    if op < 0.5:
        data = yaml.safe_load(text)
        key = rng.choice(sorted(data))
        data[key] = copy.deepcopy(rng.choice(WEIRD)) if rng.random() < 0.85 else data.pop(key, None)
        if data.get(key, 0) is None and rng.random() < 0.5:
            data.pop(key)
        if rng.random() < 0.1:
            data[rng.choice(["etaa", "layer", "lr_"])] = 1
        return yaml.safe_dump(data)
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(chars))
        kind = rng.random()
        if kind < 0.4:
            del chars[pos]
        else:
            chars.insert(pos, rng.choice(list(":-[]{}#'\"\n 019.e,&*!|>%@`")))
    return "".join(chars)


@pytest.mark.parametrize("alg", sorted(HPARAMS))
def test_fuzz_hparams_files(alg, byte_tok, tmp_path):
    rng = random.Random(f"fuzz-hparams-{alg}")  # str seeds are deterministic
    model = tiny_model("llama")
    snap = _snapshot(model)
    outcomes = {"ok": 0, "error": 0}
    for i in range(100):
        f = tmp_path / f"h{i}.yaml"
        f.write_text(_mutate_yaml(HPARAMS[alg], rng))

        def run():
            hp = se.load_hparams(f)
            return se.edit(model, byte_tok, REQ, hp).undo

        outcomes[_check(run, model, byte_tok, snap, f"{alg} hparams mutation {i}: {f.read_text()!r}")] += 1
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 30, outcomes


def test_fuzz_counterfact_records(byte_tok, tmp_path):
    from shift_edit.bench.bench_config import BenchConfig
    from shift_edit.bench.runner import evaluate_case

    rng = random.Random(1717)
    model = tiny_model("llama")
    snap = _snapshot(model)
    hp = se.ShiftHyperParams(layers=[1], eta=0.05, skip_if_predicted=False)
    cfg = BenchConfig(alg="SHIFT", hparams=hp, skip_generation=True, neighborhood_kl=True)
    outcomes = {"ok": 0, "error": 0}
    for i in range(120):
        rec = _mutate_tree(RECORD, rng)
        f = tmp_path / f"r{i}.json"
        f.write_text(json.dumps([rec]))

        def run():
            cases = bdata.load_counterfact(f)
            out = evaluate_case(model, byte_tok, cases[0], cfg, position=0, ppl_lines=None)
            assert out["case_id"] == cases[0].case_id
            return None  # evaluate_case undoes its own edit

        outcomes[_check(run, model, byte_tok, snap, f"record mutation {i}: {json.dumps(rec)[:300]}")] += 1
    assert outcomes["ok"] >= 20 and outcomes["error"] >= 20, outcomes


ID_POOL = [0, 7, "7", " 7", "7 ", -1, 10**30, 2.5, True, None, "", " ", "a/b", "a_b", "a\\b", "a" * 119, "a" * 121,
           "é" * 100, "x\x00y", "x\ny", "\x7f", "../etc", ".", "..", "case", "0-3", [], {"id": 1}]
RANGE_POOL = ["0-3", "3-0", "0-999999999999", "0-" + "9" * 30, "1,2,,3", "", ",", "-", "1-", "-1", "1--2", "a-b",
              "٣-٥", "²-3", "0-999999", "7", " 7 ", "a/b"]


def test_fuzz_data_file_case_ids(tmp_path):
    """Data files whose records carry ids of every type, with separators, very long, with NUL,
    colliding as file names; ``--case-ids`` specs with odd ranges. Each load gives cases whose
    result files are distinct, short and printable, or one ShiftEditError; never another exception."""
    from shift_edit.bench.run_dirs import case_path

    rng = random.Random(3030)
    outcomes = {"ok": 0, "error": 0}
    for i in range(200):
        ids = [rng.choice(ID_POOL) if rng.random() < 0.4 else rng.randrange(6) for _ in range(rng.randint(1, 4))]
        recs = []
        for j, cid in enumerate(ids):
            rec = copy.deepcopy(RECORD)
            rec["requested_rewrite"]["subject"] = f"Sub{j}"
            rec["requested_rewrite"]["prompt"] = "{} plays for"
            if cid is not None or rng.random() < 0.5:
                rec["case_id"] = cid
            else:
                rec.pop("case_id")
            recs.append(rec)
        f = tmp_path / f"d{i}.json"
        f.write_text(json.dumps(recs))
        spec = None if rng.random() < 0.5 else rng.choice(RANGE_POOL)
        try:
            cases = bdata.load_counterfact(f, case_ids=bdata.parse_case_ids(spec))
        except se.ShiftEditError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)[:200]
            outcomes["error"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"data mutation {i} ({ids!r}, --case-ids {spec!r}): {type(exc).__name__}: {exc}")
        names = [case_path(tmp_path, c.case_id).name for c in cases]
        assert len(set(names)) == len(names), names
        for n in names:
            assert len(n.encode()) <= 255 and n.isprintable() and "/" not in n, n
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 20 and outcomes["error"] >= 50, outcomes
    with pytest.raises(se.ShiftEditError):
        bdata.parse_case_ids("0-999999999999")
