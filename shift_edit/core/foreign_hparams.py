"""Hparams files of other toolkits: ROME's and MEMIT's JSON, EasyEdit's YAML.

``ROMEHyperParams.from_json("hparams/ROME/gpt2-xl.json")`` (kmeng01/rome, kmeng01/memit) and
``ROMEHyperParams.from_hparams("hparams/ROME/gpt2-xl")`` (an EasyEdit YAML) read those files
through :data:`FIELD_MAP`, the one table of how each of their fields maps to ours (docs/porting.md
prints it). A field with no meaning here is a one-line warning; a field whose value changes
results and cannot be honoured is an error naming it. Numbers written as strings (EasyEdit's
``v_lr: 5e-1`` is a YAML string) are numbers, as EasyEdit converts them.

What differs in the statistics: ROME/MEMIT estimate ``C = E[k kᵀ]`` from ``mom2_n_samples``
*Wikipedia articles* (each up to the model's context, so tens of millions of key vectors);
here ``C`` comes from ``mom2_n_tokens`` key vectors of WikiText (``mom2_corpus``), 100,000 by
default. The mapping keeps our token count and says so in a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from ..model.corpus import default_corpus
from .errors import ShiftEditError

log = logging.getLogger(__name__)

#: Algorithms whose ROME/MEMIT/EasyEdit files are tested here; any registered algorithm's file is read
#: through the same table (a field it has no mapping for is an error naming it).
FOREIGN_ALGORITHMS = ("ROME", "MEMIT", "FT", "FT_L", "AlphaEdit")


@dataclasses.dataclass(frozen=True)
class FieldRule:
    """How one foreign field maps: ``to`` = our field (``None``: no meaning here); ``how`` = what
    is done (for the docs); ``check`` = optional function (value) -> error message or None, for
    values that change results and cannot be honoured; ``convert`` = value -> our value."""

    to: str | None
    how: str
    check: Any = None
    convert: Any = None


def _nonzero_kl(v: Any) -> str | None:
    return None if not v else f"kl_factor={v!r}: fine-tuning here has no KL term; set it to 0"


def _layer_selection(v: Any) -> str | None:
    return None if v == "all" else f"layer_selection={v!r}: only 'all' (every listed layer) is supported"


def _objective(v: Any) -> str | None:
    return None if v in ("prompt_last",
                         "target_new") else f"objective_optimization={v!r}: use prompt_last or target_new"


_NO_MEANING_ARCH = "ignored: the architecture table (shift_edit/model/architectures.py) knows the module paths"

#: foreign field -> rule. Fields of the same name and meaning as ours map to themselves.
FIELD_MAP: dict[str, FieldRule] = {
    "alg_name": FieldRule("alg_name", "must name this class's algorithm (FT with a numeric norm_constraint is FT_L)"),
    "model_name": FieldRule("model_name", "same (hub id, folder or alias)"),
    "layers": FieldRule("layers", "same"),
    "fact_token": FieldRule("fact_token", "same values (subject_last, subject_first, last)"),
    "v_num_grad_steps": FieldRule("v_num_grad_steps", "same"),
    "v_lr": FieldRule("v_lr", "same"),
    "v_weight_decay": FieldRule("v_weight_decay", "same"),
    "clamp_norm_factor": FieldRule("clamp_norm_factor", "same"),
    "kl_factor": FieldRule("kl_factor", "same (ROME/MEMIT); FT: must be 0 (no KL term here)"),
    "mom2_adjustment": FieldRule("mom2_adjustment", "same"),
    "mom2_update_weight": FieldRule("mom2_update_weight", "same (MEMIT's λ)"),
    "mom2_dtype": FieldRule("mom2_dtype", "same"),
    "context_template_length_params": FieldRule("context_template_length_params", "same"),
    "rewrite_module_tmp": FieldRule("ff2_template", "the edited module's path template ({} = layer)"),
    "v_loss_layer": FieldRule(None,
                              "ignored: the loss is always read at the model's output (ROME's files give the last "
                              "layer)"),
    "layer_module_tmp": FieldRule(None, _NO_MEANING_ARCH),
    "mlp_module_tmp": FieldRule(None, _NO_MEANING_ARCH),
    "attn_module_tmp": FieldRule(None, _NO_MEANING_ARCH),
    "ln_f_module": FieldRule(None, _NO_MEANING_ARCH),
    "lm_head_module": FieldRule(None, _NO_MEANING_ARCH),
    "layer_selection": FieldRule(None, "'all' is what we do; anything else is an error", check=_layer_selection),
    "mom2_dataset": FieldRule("mom2_corpus", "their statistics' corpus (wikipedia, wikitext) is not read: here the "
                              "default corpus (local WikiText-2 test split, else WikiText-103 train) is used, with "
                              "one warning naming it; set mom2_corpus in our format for another text",
                              convert=lambda v: None),
    "mom2_n_samples": FieldRule(None, "articles there; here mom2_n_tokens key vectors (default 100,000) are used: "
                                "set mom2_n_tokens in our format for more"),
    "stats_dir": FieldRule(None, "ignored: statistics are cached under shift_edit's cache dir"),
    "device": FieldRule(None, "ignored: pass a model already on its device (BaseEditor(hparams, model=, tok=))"),
    "model_parallel": FieldRule(None, "ignored: place the model yourself (device_map) and pass it"),
    "fp16": FieldRule(None, "ignored (true: a warning): EasyEdit loads the model in float16; here the dtype is chosen "
                      "when loading: load_model(name, dtype='float16') then BaseEditor(hparams, model=, tok=), or "
                      "--dtype float16"),
    "P_loc": FieldRule(None, "ignored: AlphaEdit's null-space projector is computed from the statistics and cached "
                       "under shift_edit's cache dir; EasyEdit's projector file is not read"),
    "num_steps": FieldRule("steps", "FT: optimiser steps"),
    "lr": FieldRule("lr", "same"),
    "weight_decay": FieldRule("weight_decay", "same (false: 0)", convert=lambda v: 0.0 if v is False else v),
    "wd_power_law": FieldRule(None, "ignored: MEMIT's FT scales weight_decay by it only when it is a "
                              "Python tuple, and a JSON file gives a list, so their code uses weight_decay, as here"),
    "norm_constraint": FieldRule("norm_constraint",
                                 "a number: FT_L's L-infinity box (FT becomes FT_L); false/null: plain FT"),
    "batch_size": FieldRule("batch_size", "requests per forward pass (results do not depend on it)"),
    "max_length": FieldRule(None, "ignored: prompts are not truncated"),
    "objective_optimization": FieldRule("target_tokens",
                                        "target_new -> all (teacher-forced NLL of every target token); "
                                        "prompt_last -> first (ROME's FT scores every target token at the last prompt "
                                        "position; identical for one-token targets)", check=_objective,
                                        convert=lambda v: "all" if v == "target_new" else "first"),
}

#: fields whose false value asks for what happens here anyway: no warning then
_QUIET_WHEN_FALSE = {"fp16", "model_parallel"}

#: our fields the foreign files do not have, set to the behaviour of ROME's/EasyEdit's code
FOREIGN_DEFAULTS: dict[str, Any] = {"skip_if_predicted": False}

#: foreign fields that only ever occur in foreign files: their presence marks a file as foreign
_MARKERS = {"rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "v_loss_layer", "stats_dir", "device",
            "model_parallel", "fp16", "num_steps", "mom2_n_samples", "mom2_dataset", "objective_optimization",
            "lm_head_module", "ln_f_module", "attn_module_tmp", "layer_selection", "max_length", "P_loc"}


def numeric_strings(data: dict[str, Any]) -> dict[str, Any]:
    """Strings that read as numbers become numbers (EasyEdit's ``construct_float_from_scientific_notation``)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        out[k] = v
    return out


def is_foreign(data: dict[str, Any]) -> bool:
    """Whether a parsed hparams mapping is a ROME/MEMIT/EasyEdit file (by its field names)."""
    return bool(_MARKERS & set(data))


def translate(cls: type, data: dict[str, Any], *, source: str,
              class_for: Callable[[str], type]) -> tuple[type, dict[str, Any]]:
    """Map a foreign hparams mapping to ``(our hparams class, our fields)``; warns once per
    field with no meaning here, raises :class:`ShiftEditError` for a field that cannot be honoured.

    ``cls`` is the class asked for (``ROMEHyperParams.from_json``); FT with a numeric
    ``norm_constraint`` gives :class:`FTLHyperParams` (a subclass of FT's class). ``class_for``
    gives the hparams class of an algorithm name (:meth:`HyperParams.class_for`)."""
    data = numeric_strings(data)
    alg = data.get("alg_name") or cls.ALG_NAME
    if (
        alg == "FT"
        and isinstance(data.get("norm_constraint"), float)
        and not isinstance(data.get("norm_constraint"), bool)
    ):
        alg = "FT_L"
    target = class_for(alg)
    if cls.ALG_NAME and not issubclass(target, cls):
        raise ShiftEditError(f"{source}: these are {alg} hparams, not {cls.ALG_NAME}'s")
    ours = {f.name for f in dataclasses.fields(target)}
    out: dict[str, Any] = {k: v for k, v in FOREIGN_DEFAULTS.items() if k in ours}
    ignored = []
    for key, value in data.items():
        rule = FIELD_MAP.get(key)
        if rule is None:
            if key in ours:  # our own field name in a foreign file: take it as ours
                out[key] = value
                continue
            raise ShiftEditError(f"{source}: unknown field {key!r} for {alg} (no mapping; see docs/porting.md, "
                                 f"the hparams mapping table)")
        if rule.check is not None and (msg := rule.check(value)):
            raise ShiftEditError(f"{source}: {msg}")
        if key == "alg_name":
            continue
        if key == "norm_constraint" and target.ALG_NAME != "FT_L":
            if value not in (None, False):
                raise ShiftEditError(f"{source}: norm_constraint={value!r}: a number (FT_L) or false")
            continue
        if key == "kl_factor" and "kl_factor" not in ours:
            if msg := _nonzero_kl(value):
                raise ShiftEditError(f"{source}: {msg}")
            continue
        if rule.to is None or rule.to not in ours:
            ignored.append(key)
            continue
        out[rule.to] = rule.convert(value) if rule.convert is not None else value
    for key in ignored:
        if key in _QUIET_WHEN_FALSE and not data[key]:
            continue
        log.warning("%s: %s=%r %s", source, key, data[key], FIELD_MAP[key].how)
    if "mom2_n_samples" in data and "mom2_n_tokens" in ours and data.get("mom2_adjustment", True):
        out.setdefault("mom2_n_tokens", 100_000)
    if "mom2_dataset" in data and "mom2_corpus" in ours and data.get("mom2_adjustment", True):
        log.warning("%s: mom2_dataset=%r is not read here; the second-moment statistics come from %s instead "
                    "(set mom2_corpus in our format for another text)", source, data["mom2_dataset"], default_corpus())
    return target, out


def mapping_table_markdown() -> str:
    """The field mapping as a markdown table (docs/porting.md)."""
    lines = ["| their field | ours | what happens |", "|---|---|---|"]
    for key, rule in FIELD_MAP.items():
        lines.append(f"| `{key}` | {f'`{rule.to}`' if rule.to else '—'} | {rule.how} |")
    return "\n".join(lines)
