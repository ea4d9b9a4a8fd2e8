"""zsRE and KnowEdit metrics, each in its papers' family (never mixed with CounterFact's ``rome``/``top1``).

- ``zsre_token_acc`` (ROME/MEMIT/AlphaEdit, MEMIT's ``compute_rewrite_quality_zsre`` with ``dsets/zsre.py``):
  the answer ``" " + answers[0]`` is tokenised alone; for each of its tokens i the text
  ``prompt + decode(answer[:i])`` is tokenised and the token counts when the argmax after it is the first id of
  ``decode(answer[i])`` tokenised alone (MEMIT's ``test_batch_prediction_acc``; special tokens left out of both
  tokenisations of the answer). Efficacy = the mean over the answer's tokens after ``src``, generalization = the
  same after ``rephrase``, specificity = the same for the NQ question ``loc + "?"`` and its gold answer
  ``" " + loc_ans`` (the model's argmax against the gold tokens, edited or not: MEMIT's specificity is not
  agreement with the unedited model). A record's value is the mean over its tokens, as MEMIT's summarize
  averages each record's ``*_correct`` list. (Re-tokenising matters: on SmolLM2's tokenizer and the 1,037-record
  file, 32 of 14,387 prefixes and 51 target ids differ from plain teacher forcing on the answer's ids.)
- ``zsre_top1``: strict whole-answer top-1 on the same pairs (every answer token the argmax).
- ``easyedit`` (EasyEdit's ``compute_edit_quality`` via the facade's :mod:`shift_edit.compat.easyedit_metrics`):
  ``rewrite_acc`` (KnowEdit's Edit Succ.), ``rephrase_acc``, per ``portability`` sub-key the token accuracy
  of its answer, per ``locality`` sub-key the fraction of argmax tokens equal to the unedited model's, and
  Fluency = n-gram entropy of a top-k sample after the prompt (the project's :func:`ngram_entropy`).
  A record's ``portability``/``locality`` is the mean over its sub-keys (as EasyEdit's KnowEdit eval sums).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..compat import easyedit_metrics as ee
from ..core.requests import encode_prompt
from ..model.scoring import ContinuationPlan, logits_at_positions, pad_id_of
from .fact_columns import COLUMNS, EE_COLUMNS, flat_values  # noqa: F401  (re-exported)
from .facts import FactCase

ZSRE_GROUPS = (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity"))

FAMILIES = {
    "zsre_token_acc": "MEMIT's compute_rewrite_quality_zsre: per token i of ' '+answers[0] (tokenised alone), the "
                      "argmax after tokenise(prompt + decode(answer[:i])) == the first id of decode(answer[i]) "
                      "tokenised alone (no special tokens in the answer's tokenisations); efficacy (src), "
                      "generalization (rephrase), specificity (loc+'?' against ' '+loc_ans, the gold NQ answer); "
                      "record value = mean over its tokens",
    "zsre_top1": "strict whole-answer top-1: every token of the answer is the argmax (same pairs)",
    "easyedit": "EasyEdit compute_edit_quality (commit " + ee.EASYEDIT_COMMIT[:7] + "): rewrite_acc (Edit Succ.), "
                "rephrase_acc, portability (per sub-key token accuracy), locality (per sub-key agreement of argmax "
                "tokens with the unedited model's), fluency (n-gram entropy of a top-5 sample of 100 tokens after "
                "the prompt); a record's portability/locality = mean over its sub-keys",
}


def families_for(fmt: str, *, fluency: bool) -> dict[str, str | None]:
    """The metric families a data set of format ``fmt`` is scored in (params.json protocol)."""
    if fmt == "zsre":
        return {k: FAMILIES[k] for k in ("zsre_token_acc", "zsre_top1")}
    return {"easyedit": FAMILIES["easyedit"], "easyedit_fluency": "n-gram entropy (easyedit)" if fluency else None}


# --------------------------------------------------------------------------- zsRE (MEMIT)

def _memit_group(tok, prompt: str, answer: str) -> list[tuple[list[int], list[int]]]:
    """MEMIT's (prefix ids, [next answer id]) pairs for one prompt: ``prompt + decode(answer[:i])`` re-tokenised."""
    ans = list(tok(" " + answer, add_special_tokens=False).input_ids)
    out = []
    for i in range(len(ans)):
        alone = list(tok(tok.decode(ans[i]), add_special_tokens=False).input_ids)
        out.append((encode_prompt(tok, prompt + tok.decode(ans[:i])), [alone[0] if alone else ans[i]]))
    return out


def zsre_pairs(tok, case: FactCase) -> list[list[tuple[list[int], list[int]]]]:
    """Per group of :data:`ZSRE_GROUPS` (rewrite, paraphrase, neighborhood), MEMIT's scored pairs."""
    z = case.zsre
    return [_memit_group(tok, case.request.text, z["answer"]), _memit_group(tok, z["rephrase"], z["answer"]),
            _memit_group(tok, z["loc"] + "?", z["loc_ans"])]


@torch.no_grad()
def zsre_scores(model: nn.Module, tok, pairs_per_record: Sequence[list[list[tuple[list[int], list[int]]]]],
                *, batch_size: int = 64) -> list[dict[str, Any]]:
    """The ``zsre_token_acc`` and ``zsre_top1`` families of several records, their prompts in shared batches
    (a prefix that is a prefix of another record's or position's is read off that pass)."""
    flat = [p for groups in pairs_per_record for pairs in groups for p in pairs]
    plan = ContinuationPlan.build(flat)
    logits = logits_at_positions(model, plan.seqs, plan.positions, pad_id=pad_id_of(tok), batch_size=batch_size)
    scores = iter(plan.scores(logits, flat))
    out = []
    for groups in pairs_per_record:
        acc: dict[str, Any] = {"correct": {}}
        top1: dict[str, float] = {}
        for (group, name), pairs in zip(ZSRE_GROUPS, groups):
            bits = [bool(next(scores).token_correct[0]) for _ in pairs]
            acc[name] = sum(bits) / len(bits)
            acc["correct"][group] = bits
            top1[name] = float(all(bits))
        out.append({"zsre_token_acc": acc, "zsre_top1": top1})
    return out


# --------------------------------------------------------------------------- KnowEdit (EasyEdit)

def easyedit_pre(model: nn.Module, tok, case: FactCase) -> dict[str, Any]:
    """EasyEdit's pre-edit measurement of a record (its locality outputs are the unedited reference)."""
    return ee.compute_edit_quality(model, tok, case.ee_request)


def easyedit_post(model: nn.Module, tok, case: FactCase, pre: Mapping[str, Any], *, fluency: bool = False,
                  seed: int = 0) -> dict[str, Any]:
    """The ``easyedit`` family of a record on the model as it is now, against its unedited ``pre``."""
    metric = {
        "pre": dict(pre),
        "post": ee.compute_edit_quality(model, tok, case.ee_request, test_generation=fluency, seed=seed,
                                        keep_text=True),
    }
    ee.finalize_locality(metric, case.ee_request)
    return summarize_easyedit(metric["post"])


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def summarize_easyedit(post: Mapping[str, Any]) -> dict[str, Any]:
    """One record's EasyEdit numbers (fractions) from ``metric["post"]`` after ``finalize_locality``; with
    Fluency also ``fluency_text``, the sampled texts, where the post measurement kept them."""
    out: dict[str, Any] = {"rewrite_acc": _mean(post.get("rewrite_acc") or [])}
    if post.get("rephrase_acc"):
        out["rephrase_acc"] = _mean(post["rephrase_acc"])
    for section in ("portability", "locality"):
        keys = {k[: -len("_acc")]: _mean(v) for k, v in (post.get(section) or {}).items()
                if k.endswith("_acc") and v}
        if keys:
            out[f"{section}_keys"] = keys
            out[section] = _mean(list(keys.values()))
    if "fluency" in post:
        out["fluency"] = post["fluency"]["ngram_entropy"]
        if "text" in post["fluency"]:
            out["fluency_text"] = post["fluency"]["text"]
    return out

