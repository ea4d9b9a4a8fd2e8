"""shift_edit: edit factual knowledge in language models with the forward pass shift.

Public API::

    import shift_edit as se
    model, tok = se.load_model("smollm2-135m")
    hp = se.ShiftHyperParams.from_hparams("hparams/SHIFT/smollm2-135m")
    result = se.edit(model, tok, {"prompt": "{} plays for", "subject": "Lionel Messi",
                                  "target_new": {"str": "Paris"}}, hp)
    result.undo()
"""

from . import algorithms  # noqa: F401  (registers the algorithms)
from ._version import __version__ as __version__
from .algorithms.common import EditHyperParams
from .algorithms.gradient.adam import AdamHyperParams
from .algorithms.gradient.ft import FTHyperParams
from .algorithms.gradient.ft_l import FTLHyperParams
from .algorithms.gradient.sgd import SGDHyperParams
from .algorithms.locate.alphaedit import AlphaEditHyperParams
from .algorithms.locate.memit import MEMITHyperParams
from .algorithms.locate.rome import ROMEHyperParams
from .algorithms.shift.shift import ShiftHyperParams, compute_shift
from .compat.apply_names import apply_functions as _apply_functions
from .compat.apply_names import lookup as _lookup_apply
from .compat.easyedit_datasets import CounterFactDataset, KnowEditDataset, ZsreDataset
from .compat.easyedit_editor import BaseEditor, load_hparams
from .core.deltas import WeightDelta
from .core.editing import apply_algo_to_model, edit, restore_weights
from .core.errors import EditRefusedError, PatchMismatchError, ShiftEditError, UnsupportedArchitectureError
from .core.hparams import HyperParams
from .core.memory import EditMemory
from .core.registry import Algorithm, algorithm_names, get_algorithm, register
from .core.requests import EditRequest, make_request, make_requests
from .core.result import EditResult
from .files.lora import LoraExport, export_lora, read_lora
from .files.patch import apply_patch, read_patch, revert_patch, save_patch
from .model.architectures import ARCHITECTURES, ModelAdapter, supported_model_types
from .model.loading import ALIASES, load_model

# ROME/MEMIT/EasyEdit names, one per registered algorithm: apply_rome_to_model, apply_memit_to_model, ...
globals().update(_apply_functions())


def __getattr__(name: str):
    """``apply_<alg>_to_model`` of an algorithm registered after import (PEP 562)."""
    fn = _lookup_apply(name)
    if fn is None:
        raise AttributeError(f"module 'shift_edit' has no attribute {name!r}")
    return fn

__all__ = [
    "ALIASES", "ARCHITECTURES", "AdamHyperParams", "AlphaEditHyperParams", "Algorithm", "BaseEditor",
    "EditHyperParams", "EditMemory", "EditRefusedError", "EditRequest",
    "EditResult", "FTHyperParams", "FTLHyperParams", "HyperParams", "MEMITHyperParams", "ROMEHyperParams",
    "SGDHyperParams", "LoraExport", "ModelAdapter", "PatchMismatchError", "ShiftEditError",
    "ShiftHyperParams", "UnsupportedArchitectureError", "WeightDelta", "algorithm_names",
    "apply_algo_to_model", "apply_patch", "compute_shift", "edit", "export_lora",
    "get_algorithm", "load_hparams", "load_model", "make_request", "make_requests", "read_lora", "read_patch",
    "register", "restore_weights", "revert_patch", "save_patch", "supported_model_types",
    "CounterFactDataset", "KnowEditDataset", "ZsreDataset",
]
__all__ += sorted(_apply_functions())
