"""Backward Lens: project gradients of language models into the vocabulary (Katz et al., 2024).

Modules:

- :mod:`.capture`: one forward + one backward pass; x_i, δ_i and gradients of every FF1/FF2.
- :mod:`.rank`: ``grad == Σ_i x_iᵀ δ_i`` (:func:`check_decomposition`) and numerical ranks.
- :mod:`.logit_lens`: the (normalised) Logit Lens, top/bottom tokens, token ranks.
- :mod:`.views`: the layer × token grids and heatmaps, per-layer target ranks.
- :mod:`.neurons`: the gradient neuron view.
- :mod:`.segments`: subject / last subject / other / last token labels.
- :mod:`.stats`: aggregate curves over many requests.
"""

from .capture import GradientCapture, LayerCapture, MatrixCapture, capture_gradients
from .logit_lens import LogitLens, rank_in_logits
from .neurons import gradient_neurons
from .rank import (
    DecompositionCheck,
    check_decomposition,
    factored_rank,
    numerical_rank,
    outer_sum,
    rank_table,
)
from .segments import SEGMENTS, token_segments
from .stats import aggregate, lens_stats, plot_stats, record_stats
from .views import LensGrid, lens_grid, plot_grid, target_ranks

__all__ = [
    "SEGMENTS", "DecompositionCheck", "GradientCapture", "LayerCapture", "LensGrid", "LogitLens",
    "MatrixCapture", "aggregate", "capture_gradients", "check_decomposition", "factored_rank",
    "gradient_neurons", "lens_grid", "lens_stats", "numerical_rank", "outer_sum", "plot_grid",
    "plot_stats", "rank_in_logits", "rank_table", "record_stats", "target_ranks", "token_segments",
]
