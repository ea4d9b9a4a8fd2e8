"""Editing algorithms. Importing this package registers each of them once."""

from . import shift  # noqa: F401  (registers SHIFT)
from . import sgd, adam, ft, ft_l  # noqa: F401,E401  (register SGD, ADAM, FT, FT_L)
