"""shift_edit: edit factual knowledge in language models with the forward pass shift.

Public API::

    import shift_edit as se
    model, tok = se.load_model("smollm2-135m")
    hp = se.ShiftHyperParams.from_hparams("hparams/SHIFT/smollm2-135m")
    result = se.edit(model, tok, {"prompt": "{} plays for", "subject": "Lionel Messi",
                                  "target_new": {"str": "Paris"}}, hp)
    result.undo()
"""

from ._version import __version__

from .architectures import ARCHITECTURES, ModelAdapter, supported_model_types
from .deltas import WeightDelta
from .result import EditResult
from .editing import apply_algo_to_model, edit, restore_weights
from .memory import EditMemory
from .errors import PatchMismatchError, ShiftEditError, UnsupportedArchitectureError
from .hparams import HyperParams
from .registry import Algorithm, algorithm_names, get_algorithm, register
from .requests import EditRequest, make_request, make_requests
from . import algorithms  # noqa: F401,E402  (registers the algorithms)
from .algorithms.common import EditHyperParams
from .algorithms.adam import AdamHyperParams
from .algorithms.alphaedit import AlphaEditHyperParams
from .algorithms.ft import FTHyperParams
from .algorithms.ft_l import FTLHyperParams
from .algorithms.memit import MEMITHyperParams
from .algorithms.rome import ROMEHyperParams
from .algorithms.sgd import SGDHyperParams
from .algorithms.shift import ShiftHyperParams, apply_shift_to_model, compute_shift
from .editor import BaseEditor, load_hparams
from .loading import ALIASES, load_model
from .patch import apply_patch, read_patch, revert_patch, save_patch
from .lora import LoraExport, export_lora, read_lora
from .apply_names import apply_functions as _apply_functions, lookup as _lookup_apply

# ROME/MEMIT/EasyEdit names, one per registered algorithm: apply_rome_to_model, apply_memit_to_model, ...
globals().update(_apply_functions())
from .datasets import CounterFactDataset, KnowEditDataset, ZsreDataset


def __getattr__(name: str):
    """``apply_<alg>_to_model`` of an algorithm registered after import (PEP 562)."""
    fn = _lookup_apply(name)
    if fn is None:
        raise AttributeError(f"module 'shift_edit' has no attribute {name!r}")
    return fn

__all__ = [
    "ALIASES", "ARCHITECTURES", "AdamHyperParams", "AlphaEditHyperParams", "Algorithm", "BaseEditor", "EditHyperParams", "EditMemory", "EditRequest",
    "EditResult", "FTHyperParams", "FTLHyperParams", "HyperParams", "MEMITHyperParams", "ROMEHyperParams",
    "SGDHyperParams", "LoraExport", "ModelAdapter", "PatchMismatchError", "ShiftEditError",
    "ShiftHyperParams", "UnsupportedArchitectureError", "WeightDelta", "algorithm_names",
    "apply_algo_to_model", "apply_patch", "apply_shift_to_model", "compute_shift", "edit", "export_lora",
    "get_algorithm", "load_hparams", "load_model", "make_request", "make_requests", "read_lora", "read_patch",
    "register", "restore_weights", "revert_patch", "save_patch", "supported_model_types",
    "CounterFactDataset", "KnowEditDataset", "ZsreDataset",
]
__all__ += sorted(_apply_functions())
