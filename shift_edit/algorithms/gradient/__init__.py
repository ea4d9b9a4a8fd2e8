"""Gradient baselines (SGD, ADAM, FT, FT_L) on one shared training session."""
