"""The rotation of a latent basis in which a set of shift vectors is sparsest.

A model whose basal prior is N(0, I) is unchanged by an orthogonal change of latent basis, so the
likelihood alone cannot tell which basis is the "true" one. Sparse mechanism shifts can: in the
true basis each perturbation moves few units. :func:`sparsest_rotation` finds the orthogonal
matrix R that makes the rows of S R sparsest in the L1 sense (a smooth surrogate of the number
of nonzero entries, with several starting points since the problem is not convex).
"""

from __future__ import annotations

import numpy as np
import torch


def sparsest_rotation(
    shifts: np.ndarray | torch.Tensor,
    restarts: int | None = None,
    steps: int = 300,
    smoothing: float = 0.05,
    seed: int = 0,
) -> torch.Tensor:
    """Orthogonal R [K, K] minimising Σ |S R| over the rows of ``shifts`` S [T, K].

    R is searched as R0 · exp(A − Aᵀ) from ``restarts`` starting rotations R0 (the identity and
    random ones), each optimised with Adam on Σ sqrt((S R)² + ε²) with S scaled to unit mean
    absolute value (ε = ``smoothing``); the start with the smallest L1 norm wins. By default 16
    starts for up to 16 units, fewer for larger K (each start costs O(K³) per step). Deterministic
    for a ``seed``.
    """
    S = torch.as_tensor(np.asarray(shifts) if not isinstance(shifts, torch.Tensor) else shifts.detach().cpu(), dtype=torch.float32)
    if S.ndim != 2 or S.shape[0] == 0 or S.shape[1] == 0:
        raise ValueError(f"shifts must be a non-empty [T, K] matrix, got shape {tuple(S.shape)}")
    K = S.shape[1]
    if restarts is None:
        restarts = max(2, min(16, 256 // K))
    Sn = S / S.abs().mean().clamp_min(1e-8)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.linalg.qr(torch.randn(max(1, restarts), K, K, generator=gen))[0]
    starts[0] = torch.eye(K)
    A = torch.zeros_like(starts, requires_grad=True)
    opt = torch.optim.Adam([A], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            R = starts @ torch.linalg.matrix_exp(A - A.transpose(1, 2))
            loss = torch.sqrt((Sn @ R) ** 2 + smoothing**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        R = starts @ torch.linalg.matrix_exp(A - A.transpose(1, 2))
        best = R[int((Sn @ R).abs().sum((1, 2)).argmin())]
        q, r = torch.linalg.qr(best.double())  # exactly orthogonal, same columns up to sign
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.float()


@torch.no_grad()
def rotate_input(layer: torch.nn.Linear, rotation: torch.Tensor) -> None:
    """Make a layer that reads a latent z read z' = z R instead (W ← W R), in place."""
    layer.weight.copy_(layer.weight @ rotation)


@torch.no_grad()
def rotate_mean_head(layer: torch.nn.Linear, rotation: torch.Tensor) -> None:
    """Make a layer whose first K outputs are a latent mean output the mean in the basis z' = z R
    (those rows ← Rᵀ rows; the log-std rows are kept), in place."""
    K = rotation.shape[0]
    layer.weight[:K] = rotation.T @ layer.weight[:K]
    layer.bias[:K] = rotation.T @ layer.bias[:K]


__all__ = ["rotate_input", "rotate_mean_head", "sparsest_rotation"]
