"""Kohn-Sham states from GPAW: band paths, |psi_nk(r)| grids, densities.

The arrays here are raw GPAW quantities (eV, Å); model-specific preprocessing (windows,
channels) lives with the model (e.g. ase_mlks/gw/data.py).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pw_ground_state", "non_scf", "bands_near_gap", "gpaw_bands_near_gap",
           "band_path_energies", "wavefunction_moduli", "z_window", "pseudo_density"]


def pw_ground_state(atoms, ecut: float, kmesh: int, width: float = 0.05,
                    density_tol: float = 1e-4, txt=None):
    """PBE plane-wave SCF of a monolayer on the Gamma-centred ``kmesh x kmesh x 1`` grid.

    ecut: PW cutoff (eV); width: Fermi-Dirac smearing (eV); density_tol: GPAW's density
    convergence criterion. ``atoms`` is copied. Returns the converged GPAW calculator.
    """
    from gpaw import GPAW, PW, FermiDirac

    atoms = atoms.copy()
    calc = GPAW(mode=PW(ecut), xc="PBE", kpts={"size": (kmesh, kmesh, 1), "gamma": True},
                occupations=FermiDirac(width), txt=txt, convergence={"density": density_tol})
    atoms.calc = calc
    atoms.get_potential_energy()
    return calc


def non_scf(calc, kpts, nbands: int | None = None, converge_bands: int | None = None,
            symmetry: str | None = "off", txt=None):
    """Non-self-consistent GPAW run from ``calc``'s density on ``kpts`` (fractional
    k-points, a ``{'size': ..., 'gamma': ...}`` dict or a BandPath).

    nbands: bands computed (default GPAW's); converge_bands: how many of them must converge
    (default all); symmetry: GPAW's symmetry argument (None keeps GPAW's default, i.e. the
    irreducible k-points). Returns the new, converged calculator.
    """
    kw = {}
    if nbands is not None:
        kw["nbands"] = nbands
    if converge_bands is not None:
        kw["convergence"] = {"bands": converge_bands}
    if symmetry is not None:
        kw["symmetry"] = symmetry
    new = calc.fixed_density(kpts=kpts, txt=txt, **kw)
    new.get_potential_energy()
    return new


def band_path_energies(calc, path_kpts: np.ndarray, nbands: int | None = None,
                       txt=None) -> np.ndarray:
    """Non-self-consistent GPAW eigenvalues (np, nbands) in eV at fractional ``path_kpts``."""
    bcalc = non_scf(calc, np.asarray(path_kpts), nbands, txt=txt)
    nk = len(path_kpts)
    return np.array([bcalc.get_eigenvalues(kpt=k) for k in range(nk)])


def bands_near_gap(eps: np.ndarray, nelectrons: float, nbands: int = 8) -> np.ndarray:
    """The ``nbands`` bands around the gap (half below, half above) of eps (nk, nb)."""
    nocc = int(round(nelectrons / 2))
    lo = max(0, nocc - nbands // 2)
    return eps[:, lo: lo + nbands]


def gpaw_bands_near_gap(calc, path_kpts: np.ndarray, nbands: int = 8) -> np.ndarray:
    """The ``nbands`` GPAW bands around the gap (half below, half above) on a path, eV."""
    eps = band_path_energies(calc, path_kpts)
    return bands_near_gap(eps, calc.get_number_of_electrons(), nbands)


def z_window(atoms, n3: int, half_width: float) -> slice:
    """Grid slice along z covering the atoms +- ``half_width`` Å (grid point j at j*c/n3)."""
    c = atoms.cell[2, 2]
    z = atoms.positions[:, 2]
    lo = max(0, int(np.floor((z.min() - half_width) / c * n3)))
    hi = min(n3, int(np.ceil((z.max() + half_width) / c * n3)) + 1)
    return slice(lo, hi)


def wavefunction_moduli(calc, bands, kpt_indices=None, half_width: float | None = 4.0,
                        spin: int = 0) -> np.ndarray:
    """|psi_nk(r)| (nk, nb, n1, n2, n3w) in Å^-3/2 on GPAW's grid, cropped along z.

    half_width: keep the z-range of the atoms +- this many Å (None = whole cell).
    """
    atoms = calc.get_atoms()
    nk = len(calc.get_ibz_k_points())
    kidx = range(nk) if kpt_indices is None else kpt_indices
    out = []
    for k in kidx:
        per = []
        for n in bands:
            psi = np.abs(calc.get_pseudo_wave_function(band=int(n), kpt=int(k), spin=spin))
            if half_width is not None:
                psi = psi[:, :, z_window(atoms, psi.shape[2], half_width)]
            per.append(psi.astype(np.float32))
        out.append(per)
    return np.array(out)


def pseudo_density(calc, half_width: float | None = 4.0) -> np.ndarray:
    """Pseudo valence density (n1, n2, n3w) in Å^-3 on GPAW's grid, cropped along z."""
    rho = np.asarray(calc.get_pseudo_density())
    if half_width is not None:
        rho = rho[:, :, z_window(calc.get_atoms(), rho.shape[2], half_width)]
    return rho.astype(np.float32)
