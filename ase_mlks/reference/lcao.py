"""Atomic-orbital Hamiltonians H(R), S(R) in GPAW's LCAO basis (supervised baselines).

GPAW's LCAO matrices H_MM(k), S_MM(k) on the full Gamma-centred k-grid are Fourier
transformed with Wigner-Seitz images of the atom pairs; since LCAO basis functions have a
finite cutoff, this is exact once the Born-von-Karman supercell (grid x cell) exceeds
twice the interaction range. Orbitals are GPAW's: per atom its basis functions in the
order of the setup's basis (e.g. Mo dzp: 4s, 5s, 4p, 5p, 4d (sz), then the dz functions,
then the polarization p), each with m = -l..l (real SH, same order as core/orbitals.py).
"""

from __future__ import annotations

import numpy as np

from ..core.hamiltonian import TBHamiltonian
from .wannier import _grid_of, _hermitian, complete_by_time_reversal, fourier_ws

__all__ = ["ao_labels", "ao_hamiltonian"]


def ao_labels(setups) -> tuple[np.ndarray, list[str]]:
    """Atom index of every LCAO orbital and labels 'Mo0:4d-sz:m'."""
    atoms_of, labels = [], []
    for a, setup in enumerate(setups):
        for bf in setup.basis.bf_j:
            name = str(bf.type).split(" ")[0]
            for m in range(-bf.l, bf.l + 1):
                atoms_of.append(a)
                labels.append(f"{setup.symbol}{a}:{name}:{m}")
    return np.array(atoms_of), labels


def ao_hamiltonian(calc, atoms=None, threshold: float = 1e-5,
                   s_threshold: float = 1e-7) -> TBHamiltonian:
    """H(R) (eV) and S(R) of GPAW's LCAO basis from a converged calculation.

    The calculation must use a Gamma-centred k-grid without point-group symmetry. Entries
    with |H| below ``threshold`` (eV) and |S| below ``s_threshold`` are dropped. The
    overlap needs the much smaller cut: double-zeta-polarized bases are nearly linearly
    dependent (smallest eigenvalue of the MoS2 dzp S(k) ~2e-5), and dropping its
    elements below 1e-4 made S(k) indefinite.
    """
    from gpaw.lcao.tools import get_lcao_hamiltonian

    if atoms is None:
        atoms = calc.get_atoms()
    H_skMM, S_kMM = get_lcao_hamiltonian(calc)
    H_kMM = H_skMM[0]
    kpts = np.array(calc.get_ibz_k_points())
    grid = _grid_of(np.array(calc.get_bz_k_points()))
    H_ibz = [_hermitian(H) for H in H_kMM]
    S_ibz = [_hermitian(S) for S in S_kMM]
    full = complete_by_time_reversal(kpts, grid)
    ks = [k for k, _, _ in full]
    Hs = [H_ibz[i].conj() if c else H_ibz[i] for _, i, c in full]
    Ss = [S_ibz[i].conj() if c else S_ibz[i] for _, i, c in full]
    orb_atoms, labels = ao_labels(calc.dft.setups)
    pos = atoms.positions[orb_atoms]
    ks = np.array(ks)
    R, H = fourier_ws(ks, np.array(Hs), grid, atoms.cell[:], pos)
    R2, S = fourier_ws(ks, np.array(Ss), grid, atoms.cell[:], pos)
    assert np.array_equal(R, R2)
    H, S = H.real, S.real  # real orbitals: imaginary parts are numerical noise
    small = (np.abs(H) < threshold) & (np.abs(S) < s_threshold)
    H[small] = 0.0
    S[small] = 0.0
    nel = float(calc.get_number_of_electrons())
    return TBHamiltonian.from_dense(atoms.cell[:], R, H, S, orbital_atoms=orb_atoms,
                                    nelectrons=nel, pbc=(True, True, False), labels=labels)
