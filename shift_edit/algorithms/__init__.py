"""Editing algorithms. Importing this package registers each of them once."""

from . import shift  # noqa: F401  (registers SHIFT)
from . import adam, ft, ft_l, sgd  # noqa: F401  (register SGD, ADAM, FT, FT_L)
from . import memit, rome  # noqa: F401  (register ROME and MEMIT)
from . import alphaedit  # noqa: F401  (registers AlphaEdit)
from . import shift_plus  # noqa: F401  (registers SHIFT_PLUS)
from . import shift_neuron  # noqa: F401  (registers SHIFT_NEURON)
from . import shift_subject  # noqa: F401  (registers SHIFT_SUBJECT)
