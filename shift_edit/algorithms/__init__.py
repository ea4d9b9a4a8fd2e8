"""Editing algorithms. Importing this package registers each of them once.

Families: :mod:`.shift` (SHIFT, SHIFT_PLUS, SHIFT_NEURON, SHIFT_SUBJECT), :mod:`.locate` (ROME, MEMIT, AlphaEdit),
:mod:`.gradient` (SGD, ADAM, FT, FT_L); :mod:`.common` holds what every algorithm's hparams and skip check share.
"""

from importlib import import_module

#: the algorithm ``shift-edit edit`` runs unless ``--alg`` says otherwise
DEFAULT_ALGORITHM = "SHIFT"

#: the algorithm modules, imported (each registers its algorithm) in this order, which is the registry's order
#: (``algorithm_names()``: CLI choices, the test matrix, ``shift-edit models``)
MODULES = ("shift.shift", "gradient.adam", "gradient.ft", "gradient.ft_l", "gradient.sgd", "locate.rome",
           "locate.memit",
           "locate.alphaedit", "shift.shift_plus", "shift.shift_neuron", "shift.shift_subject")

for _module in MODULES:
    import_module(f"{__name__}.{_module}")
