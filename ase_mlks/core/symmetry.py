"""Crystal symmetry through spglib: space group, primitive cell, irreducible k-points."""

from __future__ import annotations

import numpy as np
import spglib
from ase import Atoms


def _spg_cell(atoms: Atoms) -> tuple:
    return (np.array(atoms.cell), atoms.get_scaled_positions(wrap=True), atoms.numbers)


def spacegroup(atoms: Atoms, symprec: float = 1e-3) -> tuple[str, int]:
    """International symbol and number, e.g. ('P-6m2', 187) for an MoS2 monolayer."""
    sym = spglib.get_spacegroup(_spg_cell(atoms), symprec=symprec)
    if sym is None:
        raise ValueError("spglib could not determine the space group")
    symbol, number = sym.split()
    return symbol, int(number.strip("()"))


def standard_primitive(atoms: Atoms, symprec: float = 1e-3) -> Atoms:
    """Standardized primitive cell (spglib), same pbc as the input."""
    cell, pos, nums = spglib.standardize_cell(_spg_cell(atoms), to_primitive=True,
                                              no_idealize=False, symprec=symprec)
    return Atoms(numbers=nums, scaled_positions=pos, cell=cell, pbc=atoms.pbc)


def irreducible_kpoints(atoms: Atoms, mesh, is_shift=(0, 0, 0),
                        symprec: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Irreducible points of a Γ-centred (or shifted) mesh: fractional k (nk, 3), weights (nk,).

    Time-reversal symmetry is used, as for any non-magnetic Hamiltonian. Weights sum to 1.
    """
    mesh = np.asarray(mesh, dtype=int)
    mapping, grid = spglib.get_ir_reciprocal_mesh(mesh, _spg_cell(atoms),
                                                  is_shift=np.asarray(is_shift, int),
                                                  is_time_reversal=True, symprec=symprec)
    uniq, counts = np.unique(mapping, return_counts=True)
    kpts = (grid[uniq] + 0.5 * np.asarray(is_shift)) / mesh
    return kpts, counts / counts.sum()
