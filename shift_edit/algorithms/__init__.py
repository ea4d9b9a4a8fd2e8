"""Editing algorithms. Importing this package registers each of them once."""

from . import shift  # noqa: F401  (registers SHIFT)
from . import rome, memit  # noqa: F401  (registers ROME and MEMIT)
