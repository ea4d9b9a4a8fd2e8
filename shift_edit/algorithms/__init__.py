"""Editing algorithms. Importing this package registers each of them once."""

#: the algorithm ``shift-edit edit`` runs unless ``--alg`` says otherwise
DEFAULT_ALGORITHM = "SHIFT"

from .shift import shift  # noqa: F401  (registers SHIFT)
from .gradient import adam, ft, ft_l, sgd  # noqa: F401  (register SGD, ADAM, FT, FT_L)
from .locate import memit, rome  # noqa: F401  (register ROME and MEMIT)
from .locate import alphaedit  # noqa: F401  (registers AlphaEdit)
from .shift import shift_plus  # noqa: F401  (registers SHIFT_PLUS)
from .shift import shift_neuron  # noqa: F401  (registers SHIFT_NEURON)
from .shift import shift_subject  # noqa: F401  (registers SHIFT_SUBJECT)
