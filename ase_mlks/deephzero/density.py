"""Differentiable density matrix D(H) with Fermi-Dirac smearing and the Mermin free energy.

For a Hamiltonian H(k) and overlap S(k) (shape (nk, n, n), Hartree) the generalized
eigenproblem is reduced with a fixed orthogonalizer X (X^H S X = 1): H' = X^H H X = U e U^H.
Occupations (spin-restricted, 0..2) are g = 2 f((e - mu) / sigma) with the chemical potential
mu fixed by sum_k w_k sum_i g_ki = N; D(k) = X U diag(g) U^H X^H.

Gradients are exact and finite for degenerate levels: the backward pass of U diag(g) U^H uses
the divided differences (g_i - g_j) / (e_i - e_j), replaced by g'(e) when |e_i - e_j| is
below ``DEGENERATE_TOL`` (so degenerate pairs with equal occupation contribute nothing and
no 1/0 appears). mu(H) is differentiated implicitly: d mu = sum w g' de / sum w g'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEGENERATE_TOL = 1e-9  # Ha


def orthogonalizer(S: np.ndarray, threshold: float = 1e-7) -> np.ndarray:
    """Canonical orthogonalizer X (nk, n, m) with X^H S X = 1 (drops S eigenvalues < threshold)."""
    S = np.asarray(S)
    out = []
    for s in S:
        w, v = np.linalg.eigh(s)
        keep = w > threshold
        out.append(v[:, keep] / np.sqrt(w[keep]))
    m = min(x.shape[1] for x in out)
    # Same number of functions at every k (needed for batching); drop the smallest extra.
    return np.ascontiguousarray(np.stack([x[:, -m:] for x in out]))


def fermi_level(eps: np.ndarray, weights: np.ndarray, nelectron: float, sigma: float,
                tol: float = 1e-13) -> float:
    """Chemical potential (Ha) with sum_k w_k sum_i 2 f((e - mu)/sigma) = nelectron (bisection)."""
    lo, hi = float(eps.min()) - 50 * sigma - 1.0, float(eps.max()) + 50 * sigma + 1.0

    def count(mu: float) -> float:
        x = np.clip((eps - mu) / sigma, -700, 700)
        return float(np.sum(weights[:, None] * 2.0 / (1.0 + np.exp(x))))

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if count(mid) > nelectron:
            hi = mid
        else:
            lo = mid
        if hi - lo < tol:
            break
    return 0.5 * (lo + hi)


class _FermiDensity(torch.autograd.Function):
    """P = U diag(g(e - mu)) U^H with eigen-decomposition done outside (no grad)."""

    @staticmethod
    def forward(ctx, hp, mu, eps, vecs, sigma):  # noqa: D102
        x = (eps - mu) / sigma
        f = torch.sigmoid(-x)
        g = 2.0 * f
        gp = -2.0 * f * (1.0 - f) / sigma  # dg/de
        ctx.save_for_backward(eps, vecs, g, gp)
        return (vecs * g.to(vecs.dtype)[..., None, :]) @ vecs.mH

    @staticmethod
    def backward(ctx, grad_p):  # noqa: D102
        eps, vecs, g, gp = ctx.saved_tensors
        gbar = vecs.mH @ grad_p @ vecs
        gbar = 0.5 * (gbar + gbar.mH)
        de = eps[..., :, None] - eps[..., None, :]
        near = de.abs() < DEGENERATE_TOL
        ratio = (g[..., :, None] - g[..., None, :]) / torch.where(near, torch.ones_like(de), de)
        gam = torch.where(near, 0.5 * (gp[..., :, None] + gp[..., None, :]), ratio)
        grad_hp = vecs @ (gam.to(gbar.dtype) * gbar) @ vecs.mH
        grad_mu = -(torch.diagonal(gbar, dim1=-2, dim2=-1).real * gp).sum()
        return grad_hp, grad_mu.reshape(()), None, None, None


@dataclass
class DensityResult:
    """D(H) and what comes with it (tensors carry gradients w.r.t. H)."""

    dm: torch.Tensor          # (nk, n, n) AO density matrix, occupations 0..2
    eps: torch.Tensor         # (nk, m) eigenvalues (Ha), ascending
    occ: torch.Tensor         # (nk, m) occupations 0..2
    mu: torch.Tensor          # () chemical potential (Ha)
    entropy: torch.Tensor     # () S / k_B per cell (spin-summed)
    mo_coeff: torch.Tensor    # (nk, n, m) eigenvectors in the AO basis (no grad)


def density_matrix(H: torch.Tensor, X: torch.Tensor, weights: torch.Tensor,
                   nelectron: float, sigma: float) -> DensityResult:
    """Differentiable D(H) for H (nk, n, n) Hermitian, orthogonalizer X (nk, n, m)."""
    hp = X.mH @ H @ X
    hp = 0.5 * (hp + hp.mH)
    with torch.no_grad():
        eps0, vecs = torch.linalg.eigh(hp.detach())
    # Hellmann-Feynman eigenvalues: value = eps0, gradient dE_i = U_i^H dH' U_i (always finite).
    eps = torch.einsum("kji,kjl,kli->ki", vecs.conj(), hp, vecs).real
    w = weights.to(eps.dtype)
    mu0 = fermi_level(eps0.numpy(), w.numpy(), nelectron, sigma)
    with torch.no_grad():
        f0 = torch.sigmoid(-(eps0 - mu0) / sigma)
        gp0 = -2.0 * f0 * (1.0 - f0) / sigma
        z = (w[:, None] * gp0).sum()
    if z.abs() > 1e-300:
        mu = mu0 + (w[:, None] * gp0 * (eps - eps0)).sum() / z
    else:  # mu anywhere in a gap: no dependence on H
        mu = torch.tensor(mu0, dtype=eps.dtype)
    p = _FermiDensity.apply(hp, mu, eps0, vecs, sigma)
    dm = X @ p @ X.mH
    x = (eps - mu) / sigma
    occ = 2.0 * torch.sigmoid(-x)
    f = occ / 2.0
    # f ln f + (1 - f) ln(1 - f), written with log-sigmoids (stable for |x| large)
    s = f * torch.nn.functional.logsigmoid(-x) + (1 - f) * torch.nn.functional.logsigmoid(x)
    entropy = -2.0 * (w[:, None] * s).sum()
    return DensityResult(dm=dm, eps=eps, occ=occ, mu=mu, entropy=entropy,
                         mo_coeff=(X @ vecs).detach())


__all__ = ["DensityResult", "density_matrix", "fermi_level", "orthogonalizer",
           "DEGENERATE_TOL"]
