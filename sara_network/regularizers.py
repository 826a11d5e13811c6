"""The paper's low-rank constraint (eqs. 4-5) as an explicit subgradient on the selected entries.

L_rank = ||A||_* with A the dense matrix holding the selected entries (the masked weights, as in the
paper, or the masked update only) and zeros elsewhere. Its subgradient is U V^T from A = U S V^T,
restricted to the non-zero singular values (at A = 0 the zero subgradient is chosen). Only the
selected entries of the subgradient reach the deltas. Computed in fp32.
"""
from __future__ import annotations

import torch


def masked_matrix(shape: tuple[int, int], indices: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """Dense fp32 matrix of `shape` with `entries` at the flat `indices` and zeros elsewhere."""
    dense = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=entries.device)
    dense.index_put_((indices,), entries.detach().to(torch.float32))
    return dense.view(shape)


def nuclear_norm_subgradient(matrix: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, float]:
    """(U V^T over the non-negligible singular values, ||matrix||_*) for a 2-D fp32 matrix."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(matrix), 0.0
    keep = s > rtol * s[0]
    return u[:, keep] @ vh[keep], float(s.sum())


def rank_penalty_grad(shape: tuple[int, int], indices: torch.Tensor, entries: torch.Tensor,
                      weight: float) -> tuple[torch.Tensor, float]:
    """Gradient of weight * ||masked matrix||_* with respect to the selected entries, and the norm."""
    subgradient, norm = nuclear_norm_subgradient(masked_matrix(shape, indices, entries))
    return weight * subgradient.view(-1)[indices], norm
