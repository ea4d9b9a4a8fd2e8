"""Exceptions raised for bad user input.

Every error a user can cause by passing a wrong argument, file or model is a
:class:`ShiftEditError`. The CLI turns exactly these into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ShiftEditError(ValueError):
    """Bad input: a wrong hparam, request, model, file or patch."""


class UnsupportedArchitectureError(ShiftEditError):
    """The model type has no entry in the architecture table and no explicit templates were given."""


class PatchMismatchError(ShiftEditError):
    """A patch was applied to a model whose base weights differ from the ones it was made for."""


class EditRefusedError(ShiftEditError):
    """The edit guard refused a delta: too large relative to the weight, or non-finite outputs."""
