"""GPAW LCAO ground states (+ D3 dispersion) of slabs: energy, forces, stress, eigenvalues."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from ..core.errors import StructureError
from .settings import DEFAULT, LCAOSettings, require_gpaw

__all__ = ["GroundState", "run_groundstate", "check_slab", "d3_results", "vacuum_level"]


@dataclass
class GroundState:
    """Results of one GPAW(+D3) calculation; energies eV, forces eV/Å, stress eV/Å^3 (Voigt).

    eigenvalues: (nk, nbands) at ``ibz_kpts`` (fractional, time-reversal-reduced grid),
    relative to the vacuum level (zero of GPAW's slab potential). ``calc`` is the GPAW
    calculator, kept for the Wannier/KS/AO post-processing.
    """

    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    energy_dft: float
    forces_dft: np.ndarray
    energy_d3: float
    forces_d3: np.ndarray
    eigenvalues: np.ndarray
    ibz_kpts: np.ndarray
    kweights: np.ndarray
    fermi_level: float
    vacuum_level: float
    cpu_time: float
    calc: object = field(repr=False, default=None)


def check_slab(atoms: Atoms) -> None:
    """Raise StructureError unless atoms form a slab: pbc (T, T, F), in-plane cell, vacuum."""
    if len(atoms) == 0:
        raise StructureError("empty structure")
    if tuple(bool(p) for p in atoms.pbc) != (True, True, False):
        raise StructureError(f"reference slabs need pbc=(True, True, False), got {atoms.pbc}")
    cell = atoms.cell[:]
    if abs(np.linalg.det(cell)) < 1e-6:
        raise StructureError("cell is missing or singular")
    if np.abs(cell[:2, 2]).max() > 1e-8 or np.abs(cell[2, :2]).max() > 1e-8:
        raise StructureError("slab cell must have a1, a2 in the xy plane and a3 along z")
    z = atoms.positions[:, 2]
    if z.min() < 3.0 or z.max() > cell[2, 2] - 3.0:
        raise StructureError("atoms must keep >= 3 Å from the non-periodic z faces "
                             f"(z range {z.min():.2f}..{z.max():.2f}, cell {cell[2, 2]:.2f})")
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, 1.0)
    if len(d):
        raise StructureError(f"atoms too close: {d.min():.3f} Å")


def d3_results(atoms: Atoms, settings: LCAOSettings) -> tuple[float, np.ndarray, np.ndarray]:
    """D3 dispersion energy (eV), forces (eV/Å) and stress (Voigt, eV/Å^3) of ``atoms``."""
    from dftd3.ase import DFTD3

    calc = DFTD3(method=settings.d3_method, damping=settings.d3_damping)
    a = atoms.copy()
    a.calc = calc
    e = a.get_potential_energy()
    f = a.get_forces()
    try:
        s = a.get_stress()
    except Exception:  # stress needs a periodic direction; slabs have two
        s = np.zeros(6)
    return float(e), np.asarray(f), np.asarray(s)


def vacuum_level(calc, margin: float = 1.0) -> float:
    """Mean plane-averaged electrostatic potential (eV) ``margin`` Å inside both z faces.

    With GPAW's zero boundary condition this is ~0 for non-polar slabs; it is stored so
    that a dipole (the two sides differ) is visible in the data.
    """
    v = calc.get_electrostatic_potential()  # (n1, n2, n3), eV
    vz = v.mean(axis=(0, 1))
    L = calc.get_atoms().cell[2, 2]
    i = max(1, int(round(margin / L * len(vz))))
    return float(0.5 * (vz[i] + vz[-i]))


def run_groundstate(atoms: Atoms, settings: LCAOSettings = DEFAULT, txt: str | None = None,
                    stress: bool = False) -> GroundState:
    """Run GPAW LCAO (+D3) on a slab and collect results (see :class:`GroundState`).

    stress: also ask GPAW for the stress (not available in LCAO mode in all GPAW versions;
    stored as None when GPAW refuses).
    """
    require_gpaw()
    from gpaw import GPAW

    check_slab(atoms)
    atoms = atoms.copy()
    t0 = time.process_time()
    calc = GPAW(**settings.gpaw_parameters(atoms), txt=txt)
    atoms.calc = calc
    e_dft = atoms.get_potential_energy()
    f_dft = atoms.get_forces()
    s_dft = None
    if stress:
        try:
            s_dft = atoms.get_stress()
        except Exception:  # LCAO stress is not implemented in every GPAW
            s_dft = None
    if settings.d3:
        e_d3, f_d3, s_d3 = d3_results(atoms, settings)
    else:
        e_d3, f_d3, s_d3 = 0.0, np.zeros_like(f_dft), np.zeros(6)
    ibzk = calc.get_ibz_k_points()
    eigs = np.array([calc.get_eigenvalues(kpt=k) for k in range(len(ibzk))])
    cpu = time.process_time() - t0
    return GroundState(
        energy=float(e_dft + e_d3),
        forces=f_dft + f_d3,
        stress=None if s_dft is None else s_dft + s_d3,
        energy_dft=float(e_dft),
        forces_dft=f_dft,
        energy_d3=e_d3,
        forces_d3=f_d3,
        eigenvalues=eigs,
        ibz_kpts=ibzk,
        kweights=calc.get_k_point_weights(),
        fermi_level=float(calc.get_fermi_level()),
        vacuum_level=vacuum_level(calc),
        cpu_time=cpu,
        calc=calc,
    )
