"""phonopy helper: a harmonic nearest-neighbour spring crystal has analytic phonons."""

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from ase_mlks.core.graph import neighbor_list
from ase_mlks.core.phonons import phonon_band_structure

A, K, MASS = 2.5, 3.0, 12.0  # Å, eV/Å^2, amu


class Springs(Calculator):
    """E = K/2 sum_bonds (|r_ij| - A)^2 over nearest neighbours of a simple-cubic crystal."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        nl = neighbor_list(self.atoms, 1.2 * A)
        stretch = nl.distances - A
        energy = 0.25 * K * np.sum(stretch**2)  # each bond counted twice
        f = (K * stretch / nl.distances)[:, None] * nl.vectors
        forces = np.zeros((len(self.atoms), 3))
        np.add.at(forces, nl.i, f)
        self.results = {"energy": energy, "forces": forces}


def test_longitudinal_branch_matches_analytic_dispersion():
    atoms = Atoms("C", cell=np.eye(3) * A, pbc=True, masses=[MASS])
    path, freqs = phonon_band_structure(atoms, Springs(), path="GX", npoints=11,
                                        supercell=(4, 4, 4), progress=False)
    q = np.linalg.norm(path.kpts, axis=1)  # Γ -> X = (0, 1/2, 0), fractional
    # ω(q) = 2 sqrt(K/M) |sin(π q)|; sqrt(eV/Å^2/amu) = 98.2269 rad/ps -> ν = ω/2π in THz
    omega0 = 98.22694788 * np.sqrt(K / MASS)
    expected = 2 * omega0 * np.abs(np.sin(np.pi * q)) / (2 * np.pi)
    np.testing.assert_allclose(np.sort(freqs, axis=1)[:, -1], expected, atol=1e-3)
    assert np.abs(freqs[0]).max() == pytest.approx(0.0, abs=1e-4)  # acoustic sum rule at Γ
