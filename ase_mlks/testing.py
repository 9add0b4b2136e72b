"""Reusable checks for ase_mlks models (in the spirit of NequIP's in-package test suites).

Every model's tests call these instead of re-deriving the physics checks:

* ``finite_difference_forces`` / ``assert_forces_consistent``: forces = -dE/dR,
* ``finite_difference_stress``: stress = (1/V) dE/dstrain,
* ``random_rotation``: a proper rotation matrix from a seed,
* ``rotate_hamiltonian_blocks``: the Wigner-D transform a rotated structure's H must obey,
* ``assert_cell_choice_invariant``: energy, forces and bands do not depend on the cell chosen
  for a crystal (a supercell folds the bands; a sheared cell of the same lattice changes nothing).

``PzTightBindingCalc`` is an analytic model (one p_z orbital per atom, hopping
``t * exp(-(d - d0) / decay)``) used to test the Hamiltonian machinery without any network.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from .core.calculator import HamiltonianCalculator
from .core.graph import neighbor_list
from .core.hamiltonian import TBHamiltonian
from .core.orbitals import OrbitalBasis


def random_rotation(seed: int = 0) -> np.ndarray:
    """Uniformly random proper rotation matrix (3, 3)."""
    q = np.random.default_rng(seed).normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def rotate_atoms(atoms: Atoms, rotation: np.ndarray) -> Atoms:
    """Copy of ``atoms`` with positions and cell rotated (column-vector convention)."""
    out = atoms.copy()
    out.positions = atoms.positions @ rotation.T
    out.set_cell(np.asarray(atoms.cell) @ rotation.T, scale_atoms=False)
    return out


def finite_difference_forces(atoms: Atoms, calc: Calculator, delta: float = 1e-3,
                             indices=None) -> np.ndarray:
    """Central-difference -dE/dR (eV/Å) for the given atoms (all by default)."""
    atoms = atoms.copy()
    atoms.calc = calc
    indices = range(len(atoms)) if indices is None else indices
    out = np.zeros((len(atoms), 3))
    for a in indices:
        for c in range(3):
            energies = []
            for sign in (1, -1):
                atoms.positions[a, c] += sign * delta
                energies.append(atoms.get_potential_energy())
                atoms.positions[a, c] -= sign * delta
            out[a, c] = -(energies[0] - energies[1]) / (2 * delta)
    return out


def finite_difference_stress(atoms: Atoms, calc: Calculator, delta: float = 1e-4) -> np.ndarray:
    """Central-difference stress (Voigt, eV/Å^3) from symmetric strains of the cell."""
    atoms = atoms.copy()
    atoms.calc = calc
    cell0 = np.array(atoms.cell)
    volume = atoms.get_volume()
    full = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            energies = []
            for sign in (1, -1):
                eps = np.eye(3)
                eps[i, j] += sign * delta / (1 if i == j else 2)
                eps[j, i] += 0 if i == j else sign * delta / 2
                atoms.set_cell(cell0 @ eps, scale_atoms=True)
                energies.append(atoms.get_potential_energy())
            atoms.set_cell(cell0, scale_atoms=True)
            full[i, j] = full[j, i] = (energies[0] - energies[1]) / (2 * delta) / volume
    return full[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def assert_forces_consistent(atoms: Atoms, calc: Calculator, atol: float = 1e-3,
                             delta: float = 1e-3) -> float:
    """Check forces against finite differences of the energy; return the max deviation."""
    probe = atoms.copy()
    probe.calc = calc
    forces = probe.get_forces()
    fd = finite_difference_forces(atoms, calc, delta)
    err = float(np.abs(forces - fd).max())
    if err > atol:
        raise AssertionError(f"forces differ from -dE/dR by {err:.3g} eV/Å (atol {atol})")
    return err


def rotate_hamiltonian_blocks(basis: OrbitalBasis, numbers, block: np.ndarray, i: int, j: int,
                              rotation: np.ndarray) -> np.ndarray:
    """The block H_ij of a structure rotated by ``rotation``: D_i H_ij D_j^T."""
    Di = basis.rotation_matrix(int(numbers[i]), rotation)
    Dj = basis.rotation_matrix(int(numbers[j]), rotation)
    return Di @ block @ Dj.T


def _sheared(atoms: Atoms) -> Atoms:
    """The same crystal in the cell (a1, a1 + a2, a3) (same lattice, atoms wrapped into it)."""
    out = atoms.copy()
    cell = np.asarray(atoms.cell)
    out.set_cell([cell[0], cell[0] + cell[1], cell[2]], scale_atoms=False)
    out.wrap()
    return out


def assert_cell_choice_invariant(make_calc: Callable[[], Calculator], atoms: Atoms,
                                 q=(0.1, 0.23, 0.0), forces: bool = True,
                                 atol: float = 1e-6) -> dict[str, float]:
    """Check that results do not depend on the cell chosen for the crystal ``atoms``.

    Against the primitive ``atoms``: the 2×1×1 supercell has twice the energy, tiled forces
    and, at fractional k (2 q1, q2, q3), the primitive bands at q and q + b1/2 together; the
    sheared cell (a1, a1 + a2, a3) has the same energy, forces and, at the same Cartesian k
    (fractional (q1, q1 + q2, q3)), the same bands. ``make_calc`` returns a fresh
    HamiltonianCalculator; ``forces=False`` checks bands only (no energy or forces).
    Returns the largest deviation of each kind (eV, eV/Å); raises AssertionError above ``atol``.
    """
    q = np.asarray(q, dtype=float)

    def evaluate(structure: Atoms, kpts) -> tuple[float, np.ndarray, np.ndarray]:
        structure = structure.copy()
        structure.calc = make_calc()
        energy, f = (structure.get_potential_energy(), structure.get_forces()) if forces \
            else (0.0, np.zeros((len(structure), 3)))
        bands = structure.calc.get_hamiltonian(structure).eigenvalues(np.atleast_2d(kpts))
        return energy, f, np.sort(bands.ravel())

    e0, f0, b0 = evaluate(atoms, [q, q + [0.5, 0.0, 0.0]])
    e2, f2, b2 = evaluate(atoms.repeat((2, 1, 1)), [[2 * q[0], q[1], q[2]]])
    e3, f3, b3 = evaluate(_sheared(atoms), [[q[0], q[0] + q[1], q[2]]])
    _, _, b3_ref = evaluate(atoms, [q])
    err = {"supercell_energy": abs(e2 - 2 * e0),
           "supercell_forces": np.abs(f2 - np.tile(f0, (2, 1))).max(),
           "supercell_bands": np.abs(b2 - b0).max(),
           "sheared_energy": abs(e3 - e0),
           "sheared_forces": np.abs(f3 - f0).max(),
           "sheared_bands": np.abs(b3 - b3_ref).max()}
    bad = {k: v for k, v in err.items() if v > atol}
    if bad:
        raise AssertionError(f"results depend on the cell choice (atol {atol}): {bad}")
    return {k: float(v) for k, v in err.items()}


class PzTightBindingCalc(HamiltonianCalculator):
    """Analytic p_z tight-binding model: one orbital and one electron per atom.

    Hopping ``t * exp(-(d - d0) / decay)`` for d < ``cutoff`` Å, on-site ``onsite`` eV (a
    scalar or per-atom array). Graphene (a = 2.46 Å) with ``t=-2.7`` and a short cutoff is the
    textbook nearest-neighbour model.
    """

    implemented_properties = ["energy", "free_energy"]
    default_parameters = {**HamiltonianCalculator.default_parameters,
                          "t": -2.7, "d0": 2.46 / np.sqrt(3), "decay": 0.45, "cutoff": 1.6,
                          "onsite": 0.0}

    def build_hamiltonian(self, atoms: Atoms) -> TBHamiltonian:
        p = self.parameters
        nl = neighbor_list(atoms, p["cutoff"])
        n = len(atoms)
        hop = p["t"] * np.exp(-(nl.distances - p["d0"]) / p["decay"])
        onsite = np.broadcast_to(np.asarray(p["onsite"], float), (n,))
        R = np.concatenate([nl.shifts, np.zeros((n, 3), int)])
        rows = np.concatenate([nl.i, np.arange(n)])
        cols = np.concatenate([nl.j, np.arange(n)])
        vals = np.concatenate([hop, onsite])
        return TBHamiltonian.from_coo(atoms.cell, n, R, rows, cols, vals,
                                      orbital_atoms=np.arange(n), nelectrons=float(n),
                                      pbc=atoms.pbc)

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        # band energy at the k-mesh: sum of occupied eigenvalues weighted by FD occupations
        from .core.electrons import fermi_dirac
        super().calculate(atoms, properties, system_changes or [])
        spec = self._spectrum()
        mu = self.get_fermi_level()
        occ = 2 * fermi_dirac(spec["eigenvalues"], mu, self.parameters["width"])
        energy = float(np.sum(spec["weights"][:, None] * occ * spec["eigenvalues"]))
        self.results = {"energy": energy, "free_energy": energy}
