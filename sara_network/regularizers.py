"""The paper's low-rank constraint (eqs. 4-5) as an explicit subgradient on the selected entries.

L_rank = ||A||_* with A the dense matrix holding the selected entries (the masked weights, as in the
paper, or the masked update only) and zeros elsewhere. Its subgradient is the polar factor U V^T of
A = U S V^T, restricted to the non-zero singular values (at A = 0 the zero subgradient is chosen).
Only the selected entries of the subgradient reach the deltas. Computed in fp32, by one of:

- `svd`: an exact SVD; singular values below 1e-6 * s_max count as zero.
- `newton_schulz`: matmuls only (no SVD), a fixed number of odd-polynomial iterations
  X <- a X + (b M + c M^2) X, M = X X^T, on A scaled by its Frobenius norm: each iteration maps every
  singular value s to p(s) and leaves the singular vectors alone. A fast phase grows small values
  about 3x per iteration; a polishing phase then converges every value it reached to 1. Singular
  values below about 3^-FAST_STEPS * ||A||_F (2e-5 ||A||_F) are not reached: they come out between 0
  and 1 instead of 1 (the SVD counts those above 1e-6 s_max fully), so on a matrix with such values
  the subgradient is damped in those directions. The nuclear norm it reports is <G, A>, which
  undercounts such values by the same factor. tests/test_regularizers.py bounds the difference to
  the SVD on SD1.5 layer shapes.

Either costs a dense polar factor per layer, far more than a training step on a CPU for every layer
of SD1.5. With rank_refresh=N the network recomputes each layer once every N steps (`refresh_slots`
spreads the layers so each step does about 1/N of the work) and applies the last value in between:
the term acts on every layer at every step, with a subgradient at most N steps old.
"""
from __future__ import annotations

from typing import Sequence

import torch

RANK_METHODS = ("svd", "newton_schulz")

# fast phase: p(s) = 3 s - 3.2 s^3 + 1.2 s^5: p(1) = 1, p'(0) = 3, p'(1) = -0.6 (contracting), and
# p maps (0, 1.21] into itself, so the iteration is stable from a Frobenius-scaled start (s <= 1).
FAST_COEFFICIENTS = (3.0, -3.2, 1.2)
# polishing phase: p(s) = (15 s - 10 s^3 + 3 s^5) / 8, the classic quintic Newton-Schulz step:
# p(1) = 1 with p'(1) = p''(1) = 0 (cubic convergence near 1).
POLISH_COEFFICIENTS = (15 / 8, -10 / 8, 3 / 8)
FAST_STEPS = 10
POLISH_STEPS = 3


def masked_matrix(shape: tuple[int, int], indices: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """Dense fp32 matrix of `shape` with `entries` at the flat `indices` and zeros elsewhere."""
    dense = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=entries.device)
    dense.index_put_((indices,), entries.detach().to(torch.float32))
    return dense.view(shape)


def svd_polar(matrix: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, float]:
    """(U V^T over the singular values above rtol * s_max, ||matrix||_*) by an exact SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(matrix), 0.0
    keep = s > rtol * s[0]
    return u[:, keep] @ vh[keep], float(s.sum())


def newton_schulz_polar(matrix: torch.Tensor, fast_steps: int = FAST_STEPS,
                        polish_steps: int = POLISH_STEPS) -> tuple[torch.Tensor, float]:
    """(approximate U V^T, <U V^T, matrix>) by matmul-only Newton-Schulz iterations (see the module doc)."""
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix  # X X^T is then the smaller Gram matrix
    norm = x.norm()
    if float(norm) == 0.0:
        return torch.zeros_like(matrix), 0.0
    x = x / norm
    for step in range(fast_steps + polish_steps):
        a, b, c = FAST_COEFFICIENTS if step < fast_steps else POLISH_COEFFICIENTS
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    polar = (x.T if tall else x).contiguous()
    return polar, float((polar * matrix).sum())


def nuclear_norm_subgradient(matrix: torch.Tensor, method: str = "svd") -> tuple[torch.Tensor, float]:
    """(subgradient U V^T, ||matrix||_*) of a 2-D fp32 matrix by `method` (RANK_METHODS)."""
    if method == "svd":
        return svd_polar(matrix)
    if method == "newton_schulz":
        return newton_schulz_polar(matrix)
    raise ValueError(f"unknown rank_method {method!r}; expected one of {', '.join(RANK_METHODS)}")


def rank_penalty_grad(shape: tuple[int, int], indices: torch.Tensor, entries: torch.Tensor,
                      weight: float, method: str = "svd") -> tuple[torch.Tensor, float]:
    """Gradient of weight * ||masked matrix||_* with respect to the selected entries, and the norm."""
    subgradient, norm = nuclear_norm_subgradient(masked_matrix(shape, indices, entries), method)
    return weight * subgradient.view(-1)[indices], norm


def polar_cost(shape: tuple[int, int]) -> int:
    """Relative work of one subgradient of an (m, n) matrix: an SVD costs about m * n * min(m, n)."""
    return shape[0] * shape[1] * min(shape)


def refresh_slots(costs: Sequence[float], period: int) -> list[int]:
    """Spread layers of the given costs over `period` steps so that each step recomputes about the same
    work: the largest first, each into the least-loaded step (ties: the earlier step, then the earlier
    layer). Deterministic, so every process of a multi-GPU run refreshes the same layers."""
    loads = [0.0] * period
    slots = [0] * len(costs)
    for layer in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(period), key=lambda s: (loads[s], s))
        slots[layer] = slot
        loads[slot] += costs[layer]
    return slots
