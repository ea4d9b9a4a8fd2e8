"""ROME's formats for tests: a CounterFact record, and an oracle for ROME/MEMIT run folders (the
per-run logic of their ``experiments/summarize.py``, written here from their published key names)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np


def rome_record(case_id, subject):
    """A CounterFact record in ROME's dataset layout (made-up prompts)."""
    return {
        "case_id": case_id,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": "{} plays for",
            "subject": subject,
            "relation_id": "P54",
            "target_new": {"str": "Paris", "id": "Q90"},
            "target_true": {"str": "Rome", "id": "Q220"},
        },
        "paraphrase_prompts": [f"Yes. {subject} plays for", f"Indeed {subject} is a player of"],
        "neighborhood_prompts": ["Totti plays for", "Baggio played for", "Pirlo is with"],
        "attribute_prompts": ["Zidane plays for"],
        "generation_prompts": [f"{subject} is", f"The team of {subject}"],
    }


def hmean(xs):
    """scipy.stats.hmean (ROME imports it; scipy is not a dependency here)."""
    return 0.0 if any(x == 0 for x in xs) else len(xs) / sum(1 / x for x in xs)


def rome_summarize(run_dir: Path, pattern: str = "case_*.json") -> dict:
    """ROME's experiments/summarize.py per-run logic (MEMIT's with pattern ``*case_*.json``), from
    its key names: time, {pre,post}.{rewrite,paraphrase,neighborhood}_prompts_probs, *_prompts_correct,
    ngram_entropy; score = harmonic mean of the three success means."""
    cur = collections.defaultdict(list)
    files = sorted(run_dir.glob(pattern), key=lambda x: int(str(x).split("_")[-1].split(".")[0]))
    for f in files:
        data = json.loads(f.read_text())
        cur["time"].append(data["time"])
        for prefix in ["pre", "post"]:
            for key in ["rewrite_prompts_probs", "paraphrase_prompts_probs"]:
                if prefix not in data or key not in data[prefix]:
                    continue
                cur[f"{prefix}_{key.split('_')[0]}_success"].append(
                    np.mean([x["target_true"] > x["target_new"] for x in data[prefix][key]]))
                cur[f"{prefix}_{key.split('_')[0]}_diff"].append(
                    np.mean([np.exp(-x["target_new"]) - np.exp(-x["target_true"]) for x in data[prefix][key]]))
            key = "neighborhood_prompts_probs"
            if prefix in data and key in data[prefix]:
                cur[f"{prefix}_neighborhood_success"].append(
                    np.mean([x["target_true"] < x["target_new"] for x in data[prefix][key]]))
                cur[f"{prefix}_neighborhood_diff"].append(
                    np.mean([np.exp(-x["target_true"]) - np.exp(-x["target_new"]) for x in data[prefix][key]]))
            for key in ["rewrite", "paraphrase", "neighborhood"]:
                if prefix in data and f"{key}_prompts_correct" in data[prefix]:
                    cur[f"{prefix}_{key}_acc"].append(np.mean(data[prefix][f"{key}_prompts_correct"]))
            for key in ["ngram_entropy", "reference_score", "essence_score"]:
                if prefix in data and key in data[prefix]:
                    cur[f"{prefix}_{key}"].append(data[prefix][key])
    out = {k: (np.mean(v), np.std(v)) for k, v in cur.items()}
    out["post_score"] = hmean([out[f"post_{k}_success"][0] for k in ("rewrite", "paraphrase", "neighborhood")])
    out["num_cases"] = len(files)
    return out
