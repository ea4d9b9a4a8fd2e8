"""The gradient as a sum of outer products (Lemma 4.1) and its numerical rank.

``grad = Σ_i x_iᵀ δ_i`` (``in_out`` layout; the transpose for ``out_in``) is a sum of
``n`` rank-one terms, so its rank is at most the prompt length ``n``, and equals ``n``
for generic inputs when ``n <= min(d_in, d_out)``. At the last layer only the last
position's δ is nonzero: the loss reads the last position's logits and nothing after
the last layer's attention mixes positions, so the MLP of position ``i < n`` cannot
change the loss; both FF1 and FF2 gradients of the last layer are rank one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .capture import GradientCapture, MatrixCapture

#: relative tolerance the decomposition check uses for float32 gradients
DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class DecompositionCheck:
    """How well one captured gradient matches Σ_i x_iᵀ δ_i."""

    name: str
    layer: int
    kind: str
    layout: str
    max_abs_error: float
    relative_error: float  # ||grad - Σ x_iᵀ δ_i||_F / ||grad||_F
    grad_norm: float
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


def outer_sum(m: MatrixCapture) -> torch.Tensor:
    """Σ_i x_iᵀ δ_i in the weight's storage layout (float64)."""
    x, d = m.x.double(), m.delta.double()
    return x.T @ d if m.layout == "in_out" else d.T @ x


def default_rtol(dtype: torch.dtype) -> float:
    """:data:`DEFAULT_RTOL` for float32, a few ulps of the model's dtype for half precision."""
    return max(DEFAULT_RTOL, 4 * torch.finfo(dtype).eps)


def check_matrix(m: MatrixCapture, *, rtol: float | None = None, atol: float | None = None) -> DecompositionCheck:
    """Compare one gradient with its outer-product decomposition (``torch.allclose``).

    ``rtol`` defaults to :func:`default_rtol` of the model's dtype; ``atol`` to
    ``rtol * max|grad|`` so near-zero entries do not fail on rounding.
    """
    rtol = default_rtol(m.dtype) if rtol is None else rtol
    if m.grad is None:
        raise ValueError(f"{m.name}: captured without weight gradients (weight_grads=False)")
    recon = outer_sum(m)
    grad = m.grad.double()
    if recon.shape != grad.shape:
        raise AssertionError(f"{m.name}: Σ x_iᵀ δ_i has shape {tuple(recon.shape)}, grad {tuple(grad.shape)}")
    scale = float(grad.abs().max()) if grad.numel() else 0.0
    atol = rtol * scale if atol is None else atol
    err = (grad - recon)
    norm = float(grad.norm())
    return DecompositionCheck(
        name=m.name, layer=m.layer, kind=m.kind, layout=m.layout,
        max_abs_error=float(err.abs().max()) if err.numel() else 0.0,
        relative_error=float(err.norm()) / norm if norm > 0 else float(err.norm()),
        grad_norm=norm,
        ok=bool(torch.allclose(grad, recon, rtol=rtol, atol=atol)),
    )


def check_decomposition(
    capture: GradientCapture, *, rtol: float | None = None, atol: float | None = None
) -> list[DecompositionCheck]:
    """Verify ``grad == Σ_i x_iᵀ δ_i`` (allclose) for every captured FF1/FF2 matrix.

    Works for both weight layouts (Conv1D ``[in, out]``, Linear ``[out, in]``). Returns one
    :class:`DecompositionCheck` per matrix that has a weight gradient;
    ``all(c.ok for c in ...)`` is the verdict.
    """
    return [check_matrix(m, rtol=rtol, atol=atol) for m in capture.matrices() if m.grad is not None]


def rank_tolerance(s_max: float, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> float:
    """The numerical-rank threshold ``s_max * max(shape) * eps(dtype)`` (NumPy's default)."""
    return s_max * max(shape) * torch.finfo(dtype).eps


def numerical_rank(matrix: torch.Tensor, *, eps_dtype: torch.dtype = torch.float32) -> int:
    """Numerical rank of a matrix: singular values above :func:`rank_tolerance`.

    The SVD runs in float64; the threshold uses ``eps_dtype`` (the precision the gradient
    was computed in), so rounding noise of float32 gradients is not counted as rank.
    """
    if matrix.numel() == 0:
        return 0
    s = torch.linalg.svdvals(matrix.double())
    if float(s[0]) == 0.0:
        return 0
    return int((s > rank_tolerance(float(s[0]), tuple(matrix.shape), eps_dtype)).sum())


def factored_singular_values(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Singular values of ``δᵀ x`` from its ``n`` factors, without forming the matrix.

    With ``xᵀ = Q_x R_x`` and ``δᵀ = Q_d R_d`` (thin QR), ``δᵀ x = Q_d (R_d R_xᵀ) Q_xᵀ``,
    whose singular values are those of the ``n × n`` matrix ``R_d R_xᵀ``. Float64.
    """
    _, rx = torch.linalg.qr(x.double().T)
    _, rd = torch.linalg.qr(delta.double().T)
    return torch.linalg.svdvals(rd @ rx.T)


def factored_rank(m: MatrixCapture, *, eps_dtype: torch.dtype | None = None) -> int:
    """Numerical rank of a captured gradient computed from its factors (fast, same threshold;
    ``eps_dtype`` defaults to float32 or the model's dtype, whichever is coarser)."""
    eps_dtype = eps_dtype or _coarser(m.dtype)
    s = factored_singular_values(m.x, m.delta)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    shape = (int(m.x.shape[1]), int(m.delta.shape[1]))
    return int((s > rank_tolerance(float(s[0]), shape, eps_dtype)).sum())


def _coarser(dtype: torch.dtype) -> torch.dtype:
    return (
        dtype if dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps else torch.float32
    )


def rank_table(capture: GradientCapture, *, factored: bool = False) -> list[dict]:
    """Per matrix: layer, kind, name, prompt length n, numerical rank, ``rank == n``.

    ``factored=True`` computes the singular values from x and δ (fast, for many prompts);
    otherwise from the gradient matrix itself. ``shape`` is the canonical ``[out, in]``.
    """
    rows = []
    for m in capture.matrices():
        rank = (factored_rank(m) if factored or m.grad is None
                else numerical_rank(m.grad, eps_dtype=_coarser(m.dtype)))
        rows.append({
            "layer": m.layer, "kind": m.kind, "name": m.name, "n": capture.n, "rank": rank,
            "full": rank == capture.n, "shape": [int(m.delta.shape[1]), int(m.x.shape[1])],
        })
    return rows
