"""The table columns of the zsRE / KnowEdit families (no model code: :mod:`.summarize` reads them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: table columns of the families (name, path in a result file's ``metrics``), in display order; the
#: per-sub-key columns are ``ee_portability_<key>`` / ``ee_locality_<key>``
COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("zsre_efficacy", ("zsre_token_acc", "efficacy")),
    ("zsre_generalization", ("zsre_token_acc", "generalization")),
    ("zsre_specificity", ("zsre_token_acc", "specificity")),
    ("zsre_efficacy_top1", ("zsre_top1", "efficacy")),
    ("zsre_generalization_top1", ("zsre_top1", "generalization")),
    ("zsre_specificity_top1", ("zsre_top1", "specificity")),
]
PORTABILITY_KEYS = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
LOCALITY_KEYS = ("Relation_Specificity", "Forgetfulness")
EE_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    *[(f"ee_portability_{k}", ("easyedit", "portability_keys", k)) for k in PORTABILITY_KEYS],
    *[(f"ee_locality_{k}", ("easyedit", "locality_keys", k)) for k in LOCALITY_KEYS],
]


def flat_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A record's family values as flat columns (fractions): the ``zsre_*`` columns of :data:`COLUMNS`, and
    ``ee_rewrite_acc``, ``ee_rephrase_acc``, ``ee_portability``, ``ee_locality``, ``ee_fluency`` (n-gram
    entropy) and the per-sub-key ``ee_portability_<key>`` / ``ee_locality_<key>``."""
    out: dict[str, float] = {}
    for name, path in COLUMNS:
        v: Any = metrics
        for k in path:
            v = v.get(k) if isinstance(v, Mapping) else None
        if isinstance(v, (int, float)):
            out[name] = float(v)
    e = metrics.get("easyedit") or {}
    for key in ("rewrite_acc", "rephrase_acc", "portability", "locality", "fluency"):
        if e.get(key) is not None:
            out[f"ee_{key}"] = float(e[key])
    for section in ("portability", "locality"):
        for k, v in (e.get(f"{section}_keys") or {}).items():
            if v is not None:
                out[f"ee_{section}_{k}"] = float(v)
    return out
