"""Locate-then-edit algorithms (ROME, MEMIT, AlphaEdit): a target value z* fitted by gradient steps, written into
FF2 through the second moment of its keys."""
