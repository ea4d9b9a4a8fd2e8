"""The EasyEdit facade: signature, semantics and metrics keys of EasyEdit's BaseEditor (commit 14cea82),
EasyEdit's result readers (summary_metrics, KnowEdit's eval, reimplemented here from their source
conventions), dataset readers and ROME's apply_<alg>_to_model names, over the whole registry."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from _tiny import tiny_hparams, tiny_model

import shift_edit as se
from shift_edit.compat import easyedit_metrics as ee
from shift_edit.core.registry import algorithm_names, get_algorithm

PROMPTS = ["Paris is the capital of", "Messi plays for"]
TARGETS = ["Rome", "Boston"]
LOCALITY = {"Relation_Specificity": {"prompt": [["Berlin is in", "Rome is in"], "Madrid is in"],
                                     "ground_truth": [["Germany", "Italy"], "Spain"]},
            "Forgetfulness": {"prompt": ["Paris is the capital of", None], "ground_truth": ["France", None]}}
PORTABILITY = {"Subject_Aliasing": {"prompt": ["The French capital is the capital of", "Leo Messi plays for"],
                                    "ground_truth": ["Rome", "Boston"]}}


def easyedit_structure(request: dict, test_generation: bool) -> dict:
    """The key structure EasyEdit 14cea82 gives one edit in ``edit``/``edit_requests``, built from
    its source conventions (compute_edit_quality, metric_meta, finalize_locality_metrics)."""
    def phase(post: bool) -> dict:
        d = {"rewrite_acc": None, "metric_meta": {"rewrite": None}, "locality": {}, "portability": {}}
        if "rephrase_prompt" in request:
            d["rephrase_acc"] = None
            d["metric_meta"]["rephrase"] = None
        for key in request["locality"]:
            d["locality"][f"{key}_output"] = None
            if post:
                d["locality"][f"{key}_acc"] = None
                d["metric_meta"][f"locality.{key}"] = None
        for key in request["portability"]:
            d["portability"][f"{key}_acc"] = None
        if test_generation:
            d["fluency"] = {"ngram_entropy": None}
        return d

    meta_keys = {"result_key", "protocol", "scorer", "comparable_group"}
    out = {"pre": phase(False), "case_id": None, "requested_rewrite": None, "post": phase(True)}
    for p in ("pre", "post"):
        out[p]["metric_meta"] = {k: dict.fromkeys(meta_keys) for k in out[p]["metric_meta"]}
    return out


def keys_of(d, skip_leaves=("requested_rewrite",)):
    if not isinstance(d, dict):
        return None
    return {k: (None if k in skip_leaves else keys_of(v)) for k, v in d.items()}


#: our keys beside EasyEdit's (documented in docs/porting.md's divergence table)
EXTRAS = {"time", "shift_edit"}


@pytest.mark.parametrize("alg", algorithm_names())
def test_edit_metrics_equal_easyedit_structure_for_every_algorithm(alg, byte_tok, corpus):
    model = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = se.BaseEditor(tiny_hparams(alg, corpus), model=model, tok=byte_tok)
    metrics, edited, weights = editor.edit(
        PROMPTS,
        TARGETS,
        ["France", "Barcelona"],
        rephrase_prompts=["The capital Paris belongs to", "Messi is a player of"],
        locality_inputs=json.loads(json.dumps(LOCALITY)),
        portability_inputs=PORTABILITY,
        subject=["Paris", "Messi"],
        keep_original_weight=True,
        test_generation=alg == "SHIFT",
    )
    assert len(metrics) == 2 and edited is model
    for i, m in enumerate(metrics):
        want = easyedit_structure(m["requested_rewrite"], alg == "SHIFT")
        assert keys_of({k: v for k, v in m.items() if k not in EXTRAS}) == keys_of(want)
        assert m["case_id"] == i and isinstance(m["time"], float)
        rr = m["requested_rewrite"]
        assert rr["prompt"] == PROMPTS[i] and rr["target_new"] == TARGETS[i] and rr["subject"] in PROMPTS[i]
        assert m["post"]["metric_meta"]["rewrite"]["comparable_group"] == ee.LM_GROUP
        assert m["shift_edit"]["algorithm"] == alg and "top1" in m["shift_edit"]["families"]
        for key, outs in m["pre"]["locality"].items():
            assert all(isinstance(o, list) and all(isinstance(t, int) for t in o) for o in outs)
        assert all(0.0 <= a <= 1.0 for k, v in m["post"]["locality"].items() if k.endswith("_acc") for a in v)
    # record 0 has two Relation_Specificity prompts and a Forgetfulness one; record 1 one and none
    assert len(metrics[0]["post"]["locality"]["Relation_Specificity_acc"]) == 2
    assert "Forgetfulness_output" not in metrics[1]["pre"]["locality"]
    # non-sequential: every edit undone, bit-exact; weights_copy = original values
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n
    assert weights and all(torch.equal(v, base[k]) for k, v in weights.items())


def test_sequential_edit_keeps_edits_and_measures_each_after_its_own(byte_tok, corpus):
    model = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = tiny_hparams("SHIFT", corpus, eta=40.0)
    editor = se.BaseEditor(hp, model=model, tok=byte_tok)
    metrics, edited, weights = editor.edit(PROMPTS, TARGETS, sequential_edit=True, verbose=False)
    assert edited is model and len(editor.history) == 2
    # the same two edits made by hand, one on top of the other, give the same weights
    ref = tiny_model("llama")
    r1 = se.edit(ref, byte_tok, {"prompt": PROMPTS[0], "target_new": TARGETS[0]}, hp)
    mid = ee.token_accuracy(ref, byte_tok, PROMPTS[0], TARGETS[0])
    se.edit(ref, byte_tok, {"prompt": PROMPTS[1], "target_new": TARGETS[1]}, hp)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    assert metrics[0]["post"]["rewrite_acc"] == mid  # measured right after its own edit (EasyEdit HEAD)
    assert r1.orig_weights.keys() == weights.keys()
    se.restore_weights(model, weights)  # ours: the pre-call originals, so this restores everything
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_ground_truth_is_the_third_positional_argument_and_kwargs_are_warned(byte_tok, corpus, caplog):
    editor = se.BaseEditor(tiny_hparams("SHIFT", corpus), model=tiny_model("llama"), tok=byte_tok)
    with caplog.at_level(logging.WARNING):
        metrics, _, _ = editor.edit(PROMPTS[0], TARGETS[0], "France", None, None, None, None, False, False,
                                    train_ds=None, keep_original_weight=False, bogus_option=3)
    assert metrics[0]["requested_rewrite"]["ground_truth"] == "France"
    assert "subject" not in metrics[0]["requested_rewrite"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "bogus_option" in warned[0] and "train_ds" not in warned[0]
    with pytest.raises(se.ShiftEditError, match="eval_metric"):
        editor.edit(PROMPTS[0], TARGETS[0], eval_metric="ppl", verbose=False)
    with pytest.raises(se.ShiftEditError, match="2 prompts but 1 target_new"):
        editor.edit(PROMPTS, "Rome", verbose=False)  # a string is one target, not its characters
    with pytest.raises(se.ShiftEditError, match="one per edit"):
        editor.edit(PROMPTS, TARGETS, rephrase_prompts=["only one"], verbose=False)


def test_token_accuracy_is_easyedits_split_of_prompt_space_target(byte_tok):
    """Byte tokenizer: the target's tokens are ' ' + target's bytes after the prompt's bytes; the
    accuracy is the fraction whose argmax at the position before is that byte."""
    model = tiny_model("gpt2")
    prompt, target = "ab", "cd"
    ids = byte_tok(prompt + " " + target).input_ids
    with torch.no_grad():
        argmax = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
    n_p = len(byte_tok(prompt).input_ids)
    labels, answers = ids[n_p:], argmax[n_p - 1 : -1]
    assert ee.token_accuracy(model, byte_tok, prompt, target) == [sum(a == b for a, b in zip(answers, labels)) / 3]
    assert ee.argmax_outputs(model, byte_tok, [prompt, prompt], [target, target]) == [answers, answers]


# --------------------------------------------------------------------------- EasyEdit's readers

def easyedit_summary_metrics(all_metrics):
    """EasyEdit's summary_metrics (easyeditor/editors/utils.py, 14cea82), reimplemented: means of
    pre/post rewrite_acc, rephrase_acc and of every *acc key of locality/portability."""
    import numpy as np

    mean_metrics = {}
    for phase in ["pre", "post"]:
        mean_metrics[phase] = {}
        for key in ["rewrite_acc", "rephrase_acc", "rewrite_ppl", "ood_acc"]:
            values = [m[phase][key] for m in all_metrics if key in m.get(phase, {})]
            if values:
                mean_metrics[phase][key] = np.mean(values)
        for section in ["locality", "portability"]:
            keys = {k for m in all_metrics for k in m.get(phase, {}).get(section, {}) if k.endswith("acc")}
            if keys:
                mean_metrics[phase][section] = {}
                for lkey in keys:
                    vals = [np.mean(m[phase][section][lkey]) for m in all_metrics
                            if lkey in m.get(phase, {}).get(section, {})]
                    if vals:
                        mean_metrics[phase][section][lkey] = np.mean(vals)
    return mean_metrics


def knowedit_eval(datas):
    """EasyEdit's KnowEdit ``eval`` (examples/run_knowedit_llama2.py), reimplemented: Edit_Succ,
    Overall_portability, Overall_locality, Fluency from post.* of each record."""
    import numpy as np

    edit_succ = sum(d["post"]["rewrite_acc"][0] for d in datas) / len(datas) * 100
    port = []
    for d in datas:
        case = [sum(v) / len(v) * 100 for v in d["post"]["portability"].values()]
        if case:
            port.append(np.mean(case))
    loc = []
    for d in datas:
        case = [sum(v) / len(v) * 100 for v in d["post"]["locality"].values()]
        if case:
            loc.append(np.mean(case))
    fluency = sum(d["post"]["fluency"]["ngram_entropy"] for d in datas) / len(datas) * 100
    return edit_succ, float(np.mean(port)), float(np.mean(loc)), fluency


@pytest.fixture(scope="module")
def shift_metrics(byte_tok, tmp_path_factory):
    model = tiny_model("llama")
    hp = se.ShiftHyperParams(layers=[1], eta=40.0, skip_if_predicted=False)
    metrics, _, _ = se.BaseEditor(hp, model=model, tok=byte_tok).edit(
        PROMPTS,
        TARGETS,
        ["France", "Barcelona"],
        rephrase_prompts=["The capital Paris belongs to", "Messi is a player of"],
        locality_inputs=json.loads(json.dumps(LOCALITY)),
        portability_inputs=PORTABILITY,
        test_generation=True,
        verbose=False,
    )
    return json.loads(json.dumps(metrics))  # as a results JSON file holds them


def test_easyedit_summary_metrics_reads_our_metrics(shift_metrics):
    theirs = easyedit_summary_metrics(shift_metrics)
    ours = ee.summary_metrics(shift_metrics)
    assert theirs.keys() == ours.keys() == {"pre", "post"}
    for phase in ("pre", "post"):
        assert set(theirs[phase]) == set(ours[phase]) >= {"rewrite_acc", "rephrase_acc", "portability"}
        assert math.isclose(theirs[phase]["rewrite_acc"], ours[phase]["rewrite_acc"])
        assert set(theirs[phase]["portability"]) == {"Subject_Aliasing_acc"}
    assert set(theirs["post"]["locality"]) == {"Relation_Specificity_acc", "Forgetfulness_acc"}
    assert "locality" not in theirs["pre"]  # pre has only the argmax outputs, as in EasyEdit


def test_knowedit_eval_reads_our_metrics(shift_metrics):
    """EasyEdit's KnowEdit eval sums every post.locality entry; since EasyEdit keeps the
    ``<key>_output`` token lists there (commit e7f7ec0) that sum fails on EasyEdit's own results as
    on ours. On the metrics as EasyEdit stored them before (outputs dropped) it gives the numbers."""
    with pytest.raises(TypeError):
        knowedit_eval(shift_metrics)
    succ, port, loc, fluency = knowedit_eval(ee.strip_outputs(shift_metrics))
    post = [m["post"] for m in shift_metrics]
    assert math.isclose(succ, 100 * sum(p["rewrite_acc"][0] for p in post) / 2)
    want_loc = [sum(sum(v) / len(v) * 100 for k, v in p["locality"].items() if k.endswith("_acc"))
                / sum(k.endswith("_acc") for k in p["locality"]) for p in post]
    assert math.isclose(loc, sum(want_loc) / 2)
    assert 0 <= port <= 100 and fluency > 0


def test_a_failed_measurement_leaves_no_edit_applied(byte_tok, corpus, monkeypatch):
    model = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = se.BaseEditor(tiny_hparams("SHIFT", corpus), model=model, tok=byte_tok)
    real, calls = ee.compute_edit_quality, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # pre, pre, then the first post measurement
            raise RuntimeError("measurement failed")
        return real(*a, **kw)

    monkeypatch.setattr(ee, "compute_edit_quality", failing)
    with pytest.raises(RuntimeError):
        editor.edit(PROMPTS, TARGETS, verbose=False)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_pre_file_and_pre_edit_reuse_the_unedited_measurements(byte_tok, corpus, tmp_path):
    editor = se.BaseEditor(tiny_hparams("SHIFT", corpus), model=tiny_model("llama"), tok=byte_tok)
    first, _, _ = editor.edit(PROMPTS, TARGETS, pre_file=str(tmp_path / "pre.json"), verbose=False)
    pre = json.loads((tmp_path / "pre.json").read_text())
    assert [m["pre"] for m in pre] == [m["pre"] for m in json.loads(json.dumps(first))]
    again, _, _ = editor.edit(PROMPTS, TARGETS, pre_edit=pre, verbose=False)
    assert [m["post"]["rewrite_acc"] for m in again] == [m["post"]["rewrite_acc"] for m in first]
    with pytest.raises(se.ShiftEditError, match="pre_edit has 1 entries"):
        editor.edit(PROMPTS, TARGETS, pre_edit=pre[:1], verbose=False)


# --------------------------------------------------------------------------- batch_edit, datasets

def test_batch_edit_chunks_times_and_restores(byte_tok, corpus):
    model = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = tiny_hparams("SHIFT", corpus, eta=40.0, batch_size=2)
    prompts = PROMPTS + ["Water boils at"]
    metrics, edited, weights = se.BaseEditor(hp, model=model, tok=byte_tok).batch_edit(
        prompts, TARGETS + ["Tokyo"], verbose=False)
    assert [m["case_id"] for m in metrics] == [0, 1, 0]  # EasyEdit counts within a chunk
    assert metrics[0]["time"] == metrics[1]["time"] != metrics[2]["time"]
    # the first chunk was one batch edit: its post equals a batch edit of the two by hand
    ref = tiny_model("llama")
    se.edit(ref, byte_tok, [{"prompt": p, "target_new": t} for p, t in zip(PROMPTS, TARGETS)], hp)
    assert metrics[1]["post"]["rewrite_acc"] == ee.token_accuracy(ref, byte_tok, PROMPTS[1], TARGETS[1])
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_dataset_readers_take_easyedit_files(tmp_path, byte_tok, corpus):
    cf = [{"case_id": 7, "prompt": "Messi plays for", "target_new": "Boston", "subject": "Messi",
           "ground_truth": "Barcelona", "rephrase_prompt": "Messi is a player of",
           "locality_prompt": "Ronaldo plays for", "locality_ground_truth": "Madrid"}]
    zsre = [{"subject": "Messi", "src": "Which team does Messi play for?", "alt": "Boston", "answers": ["Barcelona"],
             "rephrase": "Messi plays for which team?", "loc": "nq question: who wrote hamlet",
             "loc_ans": "Shakespeare"},
            {"subject": "X", "src": "What is X?", "alt": "", "answers": ["y"], "rephrase": "X?",
             "loc": "nq question: a", "loc_ans": "b"}]
    know = [{"subject": "Messi", "prompt": "Messi plays for", "target_new": "Boston", "ground_truth": "Barcelona",
             "portability": {"Reasoning": [{"prompt": "Messi's team is in the city of", "ground_truth": [["Boston"]]}]},
             "locality": {"Relation_Specificity": [{"prompt": "Messi was born in", "ground_truth": ["Rosario"]}]}}]
    for name, data in (("cf.json", cf), ("zsre.json", zsre), ("know.json", know)):
        (tmp_path / name).write_text(json.dumps(data))
    ds = se.CounterFactDataset(str(tmp_path / "cf.json"))
    assert len(ds) == 1 and ds[0]["locality_ground_truth"] == "Madrid"
    z = se.ZsreDataset(tmp_path / "zsre.json", size=5)
    assert (
        len(z) == 1 and z[0]["target_new"] == "Boston" and z[0]["ground_truth"] == "Barcelona" and z[0]["case_id"] == 0
    )
    k = se.KnowEditDataset(tmp_path / "know.json")
    assert k[0]["portability_r"][0]["prompt"].startswith("Messi's") and k[0]["locality_f"] is None
    # an EasyEdit CounterFact script, as written for EasyEdit
    editor = se.BaseEditor(tiny_hparams("SHIFT", corpus), model=tiny_model("llama"), tok=byte_tok)
    metrics, _, _ = editor.edit(
        prompts=[d["prompt"] for d in ds], target_new=[d["target_new"] for d in ds],
        ground_truth=[d["ground_truth"] for d in ds], rephrase_prompts=[d["rephrase_prompt"] for d in ds],
        locality_inputs={"neighborhood": {"prompt": [d["locality_prompt"] for d in ds],
                                          "ground_truth": [d["locality_ground_truth"] for d in ds]}},
        subject=[d["subject"] for d in ds], verbose=False)
    assert "neighborhood_acc" in metrics[0]["post"]["locality"]
    (tmp_path / "bad.json").write_text(json.dumps([{"src": "q", "alt": "a", "answers": ["b"], "rephrase": "r",
                                                    "loc": "no prefix", "loc_ans": "x"}]))
    with pytest.raises(se.ShiftEditError, match="record 0"):
        se.ZsreDataset(tmp_path / "bad.json")
    with pytest.raises(se.ShiftEditError, match="no field"):
        se.CounterFactDataset(tmp_path / "zsre.json")


# --------------------------------------------------------------------------- ROME's function names

@pytest.mark.parametrize("alg", algorithm_names())
def test_apply_alg_to_model_exists_for_every_algorithm_and_takes_callers_kwargs(alg, byte_tok, corpus, caplog):
    from shift_edit.compat.apply_names import apply_fn_name

    fn = getattr(se, apply_fn_name(alg))
    model = tiny_model("gpt2")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    req = {"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": "Boston"}}
    with caplog.at_level(logging.WARNING):
        out, orig = fn(model, byte_tok, [req], tiny_hparams(alg, corpus), copy=False, return_orig_weights=True,
                       keep_original_weight=False, train_ds=None, cache_template=None)
    assert not [r for r in caplog.records if r.name == "shift_edit.compat.apply_names"]
    assert out is model and orig and all(torch.equal(v, base[k]) for k, v in orig.items())
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters())
    se.restore_weights(model, orig)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    copy, none = fn(model, byte_tok, [req], tiny_hparams(alg, corpus), copy=True)
    assert copy is not model and none == {} and all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_apply_name_of_an_algorithm_registered_later(monkeypatch):
    from shift_edit.core import registry

    @dataclasses.dataclass(kw_only=True)
    class LaterHP(se.ShiftHyperParams):
        ALG_NAME = "LATER_ALG"

    alg = registry.Algorithm("LATER_ALG", LaterHP, get_algorithm("SHIFT").compute, "test only")
    monkeypatch.setitem(registry._REGISTRY, "LATER_ALG", alg)
    assert se.apply_later_alg_to_model.__name__ == "apply_later_alg_to_model"
    with pytest.raises(se.ShiftEditError, match="LATER_ALG"):
        se.apply_later_alg_to_model(None, None, [], se.ShiftHyperParams(layers=[1], eta=1.0))
    with pytest.raises(AttributeError):
        se.apply_nothing_registered_to_model  # noqa: B018
