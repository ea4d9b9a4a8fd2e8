"""EasyEdit's evaluation conventions, written for this toolkit (zjunlp/EasyEdit at commit
``14cea8245f06715684592ab55184939b99d70784``, July 2026: ``easyeditor/editors/utils.py``
``_prepare_requests``/``summary_metrics``, ``easyeditor/evaluate/evaluate.py``
``compute_edit_quality``, ``easyeditor/evaluate/metric_meta.py``).

Metric family: **EasyEdit token accuracy** (decoder-only teacher forcing): the text
``prompt + " " + target`` is run once; the target's tokens are the tokens after as many
tokens as ``prompt`` alone has, and the score is the fraction of them that are the argmax
at the position before. ``locality`` compares the argmax tokens before and after the edit
(``<key>_output`` holds them, ``<key>_acc`` the fraction that agree). These numbers are not
ROME's probability comparisons nor MEMIT's strict top-1 accuracy; :func:`our_families` adds
those beside them under the key ``shift_edit``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..bench.generation import generate_topk, ngram_entropy
from ..core.errors import ShiftEditError
from ..core.requests import encode_prompt, encode_target, with_leading_space
from ..model.scoring import pad_id_of, score_token_continuations

EASYEDIT_COMMIT = "14cea8245f06715684592ab55184939b99d70784"
LM_GROUP = "lm.decoder_only_teacher_forcing.token_accuracy"
LOCALITY_GROUP = "locality.lm.pre_post_argmax_token_match"


def _listify(value: Any) -> list:
    return [value] if isinstance(value, str) or value is None else list(value)


def prepare_requests(
    prompts: Sequence[str],
    target_new: Sequence[str],
    ground_truth: Sequence[str | None],
    target_neg: str | Sequence[str] | None = None,
    rephrase_prompts: str | Sequence[str] | None = None,
    locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
    portability_inputs: Mapping[str, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """EasyEdit's request dicts (``_prepare_requests``): ``prompt``, ``target_new``,
    ``ground_truth``, ``portability``, ``locality`` and, when given, ``target_neg``, ``subject``,
    ``loc_prompt``, ``rephrase_prompt``. A locality/portability entry whose prompt is ``None`` is
    left out of that request. Lengths that do not match are errors naming the input."""
    n = len(prompts)
    requests = [{"prompt": p, "target_new": t, "ground_truth": g, "portability": {}, "locality": {}}
                for p, g, t in zip(prompts, ground_truth, target_new)]

    def per_request(value: Any, name: str) -> list:
        if not isinstance(value, (str, list, tuple)) and value is not None:
            raise ShiftEditError(f"{name} must be a string or a list (one per edit), got {type(value).__name__}")
        value = _listify(value)
        if len(value) != n:
            raise ShiftEditError(f"{name} has {len(value)} entries for {n} prompts (one per edit)")
        return value

    if target_neg is not None:
        for r, v in zip(requests, per_request(target_neg, "target_neg")):
            r["target_neg"] = v
    if kwargs.get("subject") is not None:
        for r, v in zip(requests, per_request(kwargs["subject"], "subject")):
            if v not in r["prompt"]:
                raise ShiftEditError(f"subject {v!r} does not occur in prompt {r['prompt']!r}")
            r["subject"] = v
    if kwargs.get("loc_prompts") is not None:
        locs = _listify(kwargs["loc_prompts"])
        if len(locs) < n:  # EasyEdit repeats (and shuffles) them; repeated in order here
            locs = (locs * math.ceil(n / len(locs)))[:n]
        for r, v in zip(requests, per_request(locs, "loc_prompts")):
            r["loc_prompt"] = v
    if rephrase_prompts is not None:
        for r, v in zip(requests, per_request(rephrase_prompts, "rephrase_prompts")):
            r["rephrase_prompt"] = v
    for section, inputs in (("locality", locality_inputs), ("portability", portability_inputs)):
        if inputs is not None and not isinstance(inputs, Mapping):
            raise ShiftEditError(f"{section}_inputs must be a dict {{name: {{'prompt': ..., 'ground_truth': ...}}}}, "
                                 f"got {type(inputs).__name__}")
        for key, entry in (inputs or {}).items():
            if not isinstance(entry, Mapping) or "prompt" not in entry or "ground_truth" not in entry:
                raise ShiftEditError(f"{section}_inputs[{key!r}] needs 'prompt' and 'ground_truth'")
            ps, gs = entry["prompt"], entry["ground_truth"]
            if isinstance(ps, str):
                ps, gs = [ps], [gs]
            name = f"{section}_inputs[{key!r}]"
            ps = per_request(ps, f"{name}['prompt']")
            gs = per_request(gs, f"{name}['ground_truth']")
            for i, (r, p, g) in enumerate(zip(requests, ps, gs)):
                if p is not None:
                    _check_text(p, f"{name}['prompt'][{i}]")
                    _check_text(g, f"{name}['ground_truth'][{i}]")
                    r[section][key] = {"prompt": p, "ground_truth": g}
    return requests


def _check_text(value: Any, name: str, depth: int = 2) -> None:
    """A prompt or answer: a string, or a non-empty list of them (one per prompt; an answer may
    itself be a list of aliases, as in KnowEdit)."""
    if isinstance(value, str):
        return
    if depth and isinstance(value, list) and value:
        for v in value:
            _check_text(v, name, depth - 1)
        return
    raise ShiftEditError(f"{name} must be a string or a list of strings, got {value!r}")


# --------------------------------------------------------------------------- scoring

def _pairs(tok, prompts: Sequence[str], targets: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """EasyEdit's split of ``prompt + " " + target``: the first len(tok(prompt)) tokens are the prompt."""
    out = []
    for p, t in zip(prompts, targets):
        full = list(tok(f"{p} {t}").input_ids)
        n_p = len(tok(p).input_ids)
        out.append((full[:n_p], full[n_p:]))
    return out


def _score(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str]):
    pairs = _pairs(tok, prompts, targets)
    live = [i for i, (_, t) in enumerate(pairs) if t]
    scores = score_token_continuations(model, [pairs[i] for i in live], pad_id=pad_id_of(tok)) if live else []
    out: list = [None] * len(pairs)
    for i, s in zip(live, scores):
        out[i] = s
    return out


def _as_lists(prompt: str | Sequence[str], target: str | Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(prompt, str):
        return [prompt], [target if isinstance(target, str) else target[0]]
    return list(prompt), [t if isinstance(t, str) else t[0] for t in target]


def token_accuracy(model: nn.Module, tok, prompt: str | Sequence[str], target: str | Sequence[str]) -> list[float]:
    """EasyEdit's ``test_prediction_acc``: one token accuracy per prompt (prompts whose target
    has no tokens are left out, as EasyEdit drops their NaN)."""
    prompts, targets = _as_lists(prompt, target)
    return [float(s.token_correct.float().mean()) for s in _score(model, tok, prompts, targets) if s is not None]


def argmax_outputs(model: nn.Module, tok, prompt: str | Sequence[str], target: str | Sequence[str]) -> list[list[int]]:
    """EasyEdit's locality outputs: the argmax token ids at the target's positions, per prompt."""
    prompts, targets = _as_lists(prompt, target)
    return [s.argmax_ids.tolist() if s is not None else [] for s in _score(model, tok, prompts, targets)]


def lm_meta(section: str) -> dict[str, str]:
    """EasyEdit's ``metric_meta`` entry of a rewrite/rephrase accuracy (decoder-only model)."""
    return {"result_key": f"{section}_acc", "protocol": "decoder_only_teacher_forcing", "scorer": "token_accuracy",
            "comparable_group": LM_GROUP}


def locality_meta(key: str) -> dict[str, str]:
    return {"result_key": f"locality.{key}_acc", "protocol": "pre_post_argmax_token_match", "scorer": "token_match",
            "comparable_group": LOCALITY_GROUP}


def fluency(model: nn.Module, tok, prompts: Sequence[str], *, seed: int = 0,
            keep_text: bool = False) -> dict[str, Any]:
    """EasyEdit's ``test_generation_quality``: n-gram entropy of a top-k (5) sample of 100 tokens; with
    ``keep_text`` also the sampled texts (``text``, not in EasyEdit's output)."""
    texts = generate_topk(model, tok, list(prompts), max_length=100, top_k=5, seed=seed)
    out: dict[str, Any] = {"ngram_entropy": ngram_entropy(texts)}
    if keep_text:
        out["text"] = list(texts)
    return out


@torch.no_grad()
def compute_edit_quality(model: nn.Module, tok, record: Mapping[str, Any], *, test_generation: bool = False,
                         seed: int = 0, keep_text: bool = False) -> dict[str, Any]:
    """EasyEdit's ``compute_edit_quality`` for a decoder-only model: ``rewrite_acc``,
    ``rephrase_acc`` (with a ``rephrase_prompt``), ``locality`` (``<key>_output``),
    ``portability`` (``<key>_acc``), ``fluency`` (with ``test_generation``; ``keep_text`` adds the sampled
    texts) and ``metric_meta``. Every prompt of the record is scored in one batch."""
    parts: list[tuple[str, str, list[str], list[str]]] = [
        ("rewrite", "", *_as_lists(record["prompt"], record["target_new"]))
    ]
    if record.get("rephrase_prompt") is not None:
        parts.append(("rephrase", "", *_as_lists(record["rephrase_prompt"], record["target_new"])))
    for key, entry in (record.get("locality") or {}).items():
        parts.append(("locality", key, *_as_lists(entry["prompt"], entry["ground_truth"])))
    for key, entry in (record.get("portability") or {}).items():
        parts.append(("portability", key, *_as_lists(entry["prompt"], entry["ground_truth"])))
    scores = _score(model, tok, [p for part in parts for p in part[2]], [t for part in parts for t in part[3]])
    ret: dict[str, Any] = {"metric_meta": {"rewrite": lm_meta("rewrite")}, "locality": {}, "portability": {}}
    at = 0
    for section, key, prompts, _ in parts:
        mine, at = scores[at : at + len(prompts)], at + len(prompts)
        acc = [float(s.token_correct.float().mean()) for s in mine if s is not None]
        if section in ("rewrite", "rephrase"):
            ret[f"{section}_acc"] = acc
        elif section == "locality":
            ret["locality"][f"{key}_output"] = [s.argmax_ids.tolist() if s is not None else [] for s in mine]
        else:
            ret["portability"][f"{key}_acc"] = acc
    if "rephrase_acc" in ret:
        ret["metric_meta"]["rephrase"] = lm_meta("rephrase")
    if test_generation:
        prompts = record["prompt"] if isinstance(record["prompt"], list) else [record["prompt"]]
        ret["fluency"] = fluency(model, tok, prompts, seed=seed, keep_text=keep_text)
    return ret


def finalize_locality(metric: dict[str, Any], request: Mapping[str, Any]) -> None:
    """EasyEdit's ``finalize_locality_metrics``: ``post.locality.<key>_acc`` = per prompt, the
    fraction of argmax tokens that agree before and after the edit; both outputs are kept."""
    if not request.get("locality"):
        return
    pre, post = metric["pre"]["locality"], metric["post"]["locality"]
    for key in request["locality"]:
        a, b = pre[f"{key}_output"], post[f"{key}_output"]
        if len(a) != len(b):
            raise ShiftEditError(f"locality {key!r}: {len(a)} outputs before the edit, {len(b)} after")
        post[f"{key}_acc"] = [float(sum(x == y for x, y in zip(u, v)) / len(u)) if u and len(u) == len(v) else 0.0
                              for u, v in zip(a, b)]
        metric["post"].setdefault("metric_meta", {})[f"locality.{key}"] = locality_meta(key)


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def summary_metrics(all_metrics: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """EasyEdit's ``summary_metrics`` means (``pre``/``post``: ``rewrite_acc``, ``rephrase_acc``,
    and per ``locality``/``portability`` key), returned instead of printed and written to
    ``./logs/results.json``."""
    if isinstance(all_metrics, Mapping):
        all_metrics = [all_metrics]
    out: dict[str, Any] = {}
    for phase in ("pre", "post"):
        out[phase] = {}
        for key in ("rewrite_acc", "rephrase_acc", "rewrite_ppl", "ood_acc"):
            vals = [_mean(m[phase][key]) if isinstance(m[phase][key], list) else m[phase][key]
                    for m in all_metrics if key in m.get(phase, {}) and m[phase][key] != []]
            if vals:
                out[phase][key] = _mean(vals)
        for section in ("locality", "portability"):
            keys = sorted({k for m in all_metrics for k in (m.get(phase, {}).get(section) or {}) if k.endswith("acc")})
            if keys:
                out[phase][section] = {
                    k: _mean(
                        [
                            _mean(m[phase][section][k])
                            for m in all_metrics
                            if k in (m.get(phase, {}).get(section) or {}) and m[phase][section][k]
                        ]
                    )
                    for k in keys
                }
    return out


# --------------------------------------------------------------------------- our families

OUR_FAMILIES = {
    "top1": "strict top-1 (MEMIT): every token of target_new is the argmax under teacher forcing, "
            "target with the leading space our tokenisation gives it",
    "rome": "ROME probability comparison: success = mean token NLL of target_new < that of ground_truth "
            "(needs ground_truth); nll = mean token NLLs",
    "easyedit": "the pre/post *_acc values beside: EasyEdit token accuracy (not comparable to the above)",
}


@torch.no_grad()
def our_families(model: nn.Module, tok, request: Mapping[str, Any]) -> dict[str, Any]:
    """Strict top-1 and ROME's comparison for the rewrite (and rephrase) prompt, our conventions."""
    prompts = {"rewrite": request["prompt"]}
    if request.get("rephrase_prompt") is not None:
        prompts["rephrase"] = request["rephrase_prompt"]
    truth = request.get("ground_truth")
    truth = truth[0] if isinstance(truth, list) and truth else truth
    pairs = []
    for text in prompts.values():
        text = text if isinstance(text, str) else text[0]
        ids = encode_prompt(tok, text)
        pairs.append((ids, encode_target(tok, text, with_leading_space(text, request["target_new"]))))
        if truth:
            pairs.append((ids, encode_target(tok, text, with_leading_space(text, truth))))
    scores = iter(score_token_continuations(model, pairs, pad_id=pad_id_of(tok)))
    out: dict[str, Any] = {}
    for name in prompts:
        new = next(scores)
        out[f"{name}_top1"] = float(new.all_correct)
        out[f"{name}_nll_new"] = new.mean_nll
        if truth:
            true = next(scores)
            out[f"{name}_nll_true"] = true.mean_nll
            out[f"{name}_success"] = float(new.mean_nll < true.mean_nll)
    return out


def strip_outputs(all_metrics: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The metrics as EasyEdit stored them before its commit e7f7ec0 (June 2026): without the
    locality ``<key>_output`` lists and without ``pre.locality``; what EasyEdit's KnowEdit
    ``eval`` (examples/run_knowedit_llama2.py) sums over."""
    out = []
    for m in all_metrics:
        m = copy.deepcopy(dict(m))
        for phase in ("pre", "post"):
            loc = m.get(phase, {}).get("locality")
            if isinstance(loc, dict):
                for k in [k for k in loc if k.endswith("_output")]:
                    del loc[k]
        m.get("pre", {}).pop("locality", None)
        out.append(m)
    return out
