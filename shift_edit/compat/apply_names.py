"""ROME/MEMIT/EasyEdit function names for every registered algorithm: ``apply_rome_to_model``,
``apply_memit_to_model``, ``apply_ft_to_model``, ``apply_shift_to_model``, ... derived from the
registry (an algorithm registered later gets its name too: ``shift_edit.apply_<name>_to_model``
is looked up when first used).

Each takes the arguments their callers pass: ``(model, tok, requests, hparams, copy=False,
return_orig_weights=False)`` (ROME), plus ``cache_template`` (MEMIT) and
``keep_original_weight``/``train_ds`` (EasyEdit), and returns ROME's ``(model, orig_weights)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from ..core.editing import apply_algo_to_model
from ..core.errors import ShiftEditError
from ..core.hparams import HyperParams
from ..core.registry import algorithm_names, get_algorithm

log = logging.getLogger(__name__)

#: keyword arguments ROME's, MEMIT's and EasyEdit's callers pass that change nothing here:
#: ``cache_template`` (MEMIT's z* cache path; ours is ``zstar_cache``), ``keep_original_weight``
#: (EasyEdit: the deltas are always computed against the model as given), ``train_ds`` (IKE).
ACCEPTED = frozenset({"cache_template", "keep_original_weight", "train_ds"})


def apply_fn_name(alg: str) -> str:
    """``"FT_L"`` -> ``"apply_ft_l_to_model"``."""
    return "apply_" + alg.lower().replace("-", "_") + "_to_model"


def make_apply_fn(alg: str) -> Callable[..., tuple[nn.Module, dict]]:
    """ROME's ``apply_<alg>_to_model`` for the registered algorithm ``alg``."""
    get_algorithm(alg)

    def apply_to_model(model: nn.Module, tok, requests: Any, hparams: HyperParams, copy: bool = False,
                       return_orig_weights: bool = False, **kwargs: Any) -> tuple[nn.Module, dict]:
        if type(hparams).ALG_NAME != alg:
            raise ShiftEditError(f"{apply_fn_name(alg)} got {type(hparams).__name__} "
                                 f"({type(hparams).ALG_NAME or 'no algorithm'}); pass {alg} hparams")
        unknown = sorted(set(kwargs) - ACCEPTED)
        if unknown:
            log.warning("%s: ignored keyword arguments %s", apply_fn_name(alg), ", ".join(unknown))
        return apply_algo_to_model(model, tok, requests, hparams, copy, return_orig_weights)

    apply_to_model.__name__ = apply_to_model.__qualname__ = apply_fn_name(alg)
    apply_to_model.__doc__ = (
        f"ROME's contract for {alg}: edit ``model`` in place (``copy=True``: a deep copy) with ``requests`` "
        f"(ROME, CounterFact or EasyEdit format); returns ``(model, orig_weights)``, ``orig_weights`` "
        f"= {{param name: original tensor}} when ``return_orig_weights`` (restore with "
        f"``shift_edit.restore_weights``). Extra keywords of ROME/MEMIT/EasyEdit callers are accepted.")
    return apply_to_model


def apply_functions() -> dict[str, Callable[..., tuple[nn.Module, dict]]]:
    """``{apply_<alg>_to_model: function}`` for every algorithm registered now."""
    return {apply_fn_name(a): make_apply_fn(a) for a in algorithm_names()}


def lookup(name: str) -> Callable[..., tuple[nn.Module, dict]] | None:
    """The function called ``name`` if it is ``apply_<registered alg>_to_model``, else None."""
    for a in algorithm_names():
        if apply_fn_name(a) == name:
            return make_apply_fn(a)
    return None
