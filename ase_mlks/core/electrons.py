"""Electron statistics on band energies: Fermi level, occupations, density of states (eV)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from .errors import AseMlksError


def fermi_dirac(energies: np.ndarray, mu: float, width: float) -> np.ndarray:
    """Occupation f((e - mu)/width) in [0, 1]; ``width`` = k_B T in eV (0 gives a step)."""
    e = np.asarray(energies, dtype=float)
    if width <= 0:
        return np.where(e < mu, 1.0, np.where(e == mu, 0.5, 0.0))
    return expit(-(e - mu) / width)


def electron_count(eigenvalues: np.ndarray, weights: np.ndarray, mu: float, width: float,
                   spin_degeneracy: float = 2.0) -> float:
    """Electrons below ``mu``: eigenvalues (nk, nb) eV, k weights (nk,) summing to 1."""
    f = fermi_dirac(eigenvalues, mu, width)
    return float(spin_degeneracy * np.sum(np.asarray(weights)[:, None] * f))


def fermi_level(eigenvalues: np.ndarray, weights: np.ndarray | None, nelectrons: float,
                width: float = 0.05, spin_degeneracy: float = 2.0) -> float:
    """Chemical potential (eV) at which the smeared bands hold ``nelectrons``.

    ``eigenvalues``: (nk, nbands) eV; ``weights``: (nk,) normalized to 1 (uniform if None).
    With Fermi–Dirac smearing an insulator's level falls in the middle of its gap, as in
    GPAW.
    """
    eps = np.atleast_2d(np.asarray(eigenvalues, dtype=float))
    w = np.full(len(eps), 1.0 / len(eps)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    capacity = spin_degeneracy * eps.shape[1]
    if not 0 < nelectrons < capacity:
        raise AseMlksError(
            f"{nelectrons} electrons do not fit into {eps.shape[1]} bands "
            f"(capacity {capacity}); compute more bands")
    width = max(width, 1e-6)  # a tiny width keeps the equation continuous for brentq
    lo, hi = eps.min() - 50 * width - 1.0, eps.max() + 50 * width + 1.0

    def excess(mu: float) -> float:
        return electron_count(eps, w, mu, width, spin_degeneracy) - nelectrons

    return float(brentq(excess, lo, hi, xtol=1e-10))


def density_of_states(eigenvalues: np.ndarray, weights: np.ndarray | None, energies: np.ndarray,
                      width: float = 0.1, spin_degeneracy: float = 2.0) -> np.ndarray:
    """Gaussian-broadened DOS (states/eV per cell) on ``energies`` (eV)."""
    eps = np.atleast_2d(np.asarray(eigenvalues, dtype=float))
    w = np.full(len(eps), 1.0 / len(eps)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    x = (np.asarray(energies)[:, None, None] - eps[None]) / width
    g = np.exp(-0.5 * x**2) / (np.sqrt(2 * np.pi) * width)
    return spin_degeneracy * np.einsum("ekn,k->e", g, w)
