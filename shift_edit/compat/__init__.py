"""Compatibility with EasyEdit, ROME and MEMIT: the BaseEditor facade, their metrics, apply_<alg>_to_model names,
EasyEdit dataset classes, and result export to / import from their formats."""
