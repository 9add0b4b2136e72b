"""Phonons from any ase_mlks force calculator, through phonopy's own API (finite displacements)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from tqdm.auto import tqdm


def _to_phonopy(atoms: Atoms):
    from phonopy.structure.atoms import PhonopyAtoms
    # masses passed explicitly: phonopy would otherwise use its own table, not the atoms'
    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.array(atoms.cell),
                        scaled_positions=atoms.get_scaled_positions(),
                        masses=atoms.get_masses())


def _to_ase(cell, pbc) -> Atoms:
    return Atoms(symbols=cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions,
                 masses=cell.masses, pbc=pbc)


def make_phonopy(atoms: Atoms, calc: Calculator, supercell=(3, 3, 3),
                 displacement: float = 0.01, primitive_matrix=None, progress: bool = True):
    """A ``phonopy.Phonopy`` object with force constants computed by ``calc``.

    ``supercell``: diagonal multiplicities or a 3x3 matrix; ``displacement`` in Å. Each
    symmetry-distinct displacement costs one force call.
    """
    from phonopy import Phonopy

    matrix = np.diag(supercell) if np.ndim(supercell) == 1 else np.asarray(supercell)
    phonon = Phonopy(_to_phonopy(atoms), supercell_matrix=matrix,
                     primitive_matrix=primitive_matrix)
    phonon.generate_displacements(distance=displacement)
    forces = []
    for sc in tqdm(phonon.supercells_with_displacements, desc="phonon displacements",
                   disable=not progress):
        displaced = _to_ase(sc, atoms.pbc)
        displaced.calc = calc
        forces.append(displaced.get_forces())
    phonon.forces = np.array(forces)
    phonon.produce_force_constants()
    return phonon


def phonon_band_structure(atoms: Atoms, calc: Calculator, path: str | None = None,
                          npoints: int = 51, **kwargs):
    """Phonon frequencies (THz) along an ASE band path: returns (BandPath, (nk, 3N) array)."""
    phonon = make_phonopy(atoms, calc, **kwargs)
    bandpath = atoms.cell.bandpath(path, npoints=npoints)
    phonon.run_qpoints(bandpath.kpts)
    return bandpath, phonon.get_qpoints_dict()["frequencies"]


def phonon_dos(atoms: Atoms, calc: Calculator, mesh=(20, 20, 20), **kwargs):
    """Total phonon DOS: (frequencies THz, states/THz)."""
    phonon = make_phonopy(atoms, calc, **kwargs)
    phonon.run_mesh(mesh)
    phonon.run_total_dos()
    d = phonon.get_total_dos_dict()
    return d["frequency_points"], d["total_dos"]
