"""FT_L baseline: :mod:`.ft` with ROME's norm constraint (FT-L).

After every optimiser step each trained weight is clamped to the L-infinity box of
radius ``norm_constraint`` around its original value, so no entry of the delta
exceeds ``norm_constraint`` in magnitude.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...core.registry import Computed, register
from ...core.requests import EditRequest
from .ft import FTHyperParams, finetune


@dataclasses.dataclass(kw_only=True)
class FTLHyperParams(FTHyperParams):
    """Hparams of FT-L: fine-tuning plus ``norm_constraint`` (epsilon of the L-inf box)."""

    ALG_NAME = "FT_L"

    norm_constraint: float

    def validate(self) -> None:
        super().validate()
        if not self.norm_constraint > 0:
            self._fail("norm_constraint", self.norm_constraint, "it must be > 0")


def compute_ft_l(model: nn.Module, tok, requests: list[EditRequest], hparams: FTLHyperParams) -> Computed:
    """Deltas of box-constrained fine-tuning, computed against ``model`` (weights left unchanged)."""
    return finetune(model, tok, requests, hparams, epsilon=hparams.norm_constraint)


register("FT_L", FTLHyperParams, compute_ft_l,
         "fine-tuning with ROME's L-inf norm constraint around the original weights")
