"""The hparams a command runs with, found through the registry: ``--hparams FILE`` or the
algorithm's shipped ``hparams/<ALG>/<model>.yaml`` (``shift-edit edit`` and ``shift-edit bench``)."""

from __future__ import annotations

from ..core.errors import ShiftEditError
from ..core.hparams import HyperParams
from ..core.registry import get_algorithm, load_hparams


def find_hparams(alg: str, model: str, given: str | None) -> HyperParams | None:
    """``given`` (the ``--hparams`` file) if set, else ``alg``'s shipped hparams for ``model``,
    loaded; None when there is neither.

    Raises:
        ShiftEditError: the file cannot be read or is not valid, or it is for another algorithm.
    """
    path = given or get_algorithm(alg).shipped_hparams(model)
    if path is None:
        return None
    hp = load_hparams(path)
    if type(hp).ALG_NAME != alg:
        raise ShiftEditError(f"--hparams {path} is for {type(hp).ALG_NAME}, not --alg {alg}")
    return hp
