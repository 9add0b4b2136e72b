"""DFT engines: the energy E[D] and Kohn-Sham matrix F[D] = dE/dD for a density matrix D.

The interface (:class:`DFTEngine`) is deliberately narrow so that another LCAO code (e.g.
GPAW-LCAO) can implement it. All matrices are in the project's orbital order
(``ase_mlks.core.orbitals``: shells as the basis lists them, real SH m = -l..l, p = (y, z, x))
and carry a leading k-point axis: shape (nk, nao, nao); molecules have nk = 1 and real
matrices, periodic cells complex Bloch matrices ``M(k) = sum_R exp(2 pi i k.R) M(R)``.
Energies are in Hartree per molecule / per cell (PySCF's unit); convert with ``HARTREE``.

PySCF is an optional dependency: importing this module works without it, constructing a
:class:`PySCFEngine` raises a clear ImportError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from ase import Atoms
from ase.units import Bohr, Hartree
from scipy.linalg import block_diag

from ..core.errors import StructureError
from ..core.orbitals import OrbitalBasis, pyscf_to_ours
from .density import fermi_level

HARTREE = Hartree  # eV per Hartree
L_LETTERS = "spdfg"


@runtime_checkable
class DFTEngine(Protocol):
    """What variational DFT needs from a DFT code (units: Hartree, per molecule / cell)."""

    nao: int                 # orbitals per molecule / cell
    nelectron: float         # (valence) electrons per molecule / cell
    kpts: np.ndarray         # (nk, 3) fractional k-points; [[0, 0, 0]] for molecules
    kweights: np.ndarray     # (nk,) summing to 1
    periodic: bool

    def overlap(self) -> np.ndarray:
        """S(k), shape (nk, nao, nao)."""

    def core_hamiltonian(self) -> np.ndarray:
        """Kinetic + external (pseudo)potential h(k), shape (nk, nao, nao)."""

    def energy_and_fock(self, dm: np.ndarray) -> tuple[float, np.ndarray]:
        """E[D] (Ha) and F[D] = dE/dD(k) / w_k, shape (nk, nao, nao), for D(k) (nk, nao, nao)."""


@dataclass
class SCFResult:
    """Conventional SCF reference of an engine (same functional, basis, grids, smearing)."""

    energy: float            # E[D_scf] (Ha), without the entropy term
    free_energy: float       # E - sigma * S (Ha)
    fock: np.ndarray         # H_scf = F[D_scf] (nk, nao, nao), our orbital order
    dm: np.ndarray           # D_scf (nk, nao, nao)
    mo_energy: np.ndarray    # (nk, nao) Ha
    mu: float                # chemical potential (Ha)
    cycles: int
    seconds: float


def _require_pyscf():
    try:
        import pyscf  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DeepH-Zero's DFT engine needs PySCF: pip install 'ase_mlks[pyscf]' "
            "(or pip install pyscf)") from err


def _shell_layout(mol) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Per atom, the l of each (contracted) radial function in PySCF's AO order."""
    per_atom: list[list[int]] = [[] for _ in range(mol.natm)]
    for ib in range(mol.nbas):
        a, l, nctr = mol.bas_atom(ib), mol.bas_angular(ib), mol.bas_nctr(ib)
        per_atom[a].extend([l] * nctr)
    return per_atom, []


def pyscf_basis_and_permutation(mol, numbers) -> tuple[OrbitalBasis, np.ndarray]:
    """OrbitalBasis of a PySCF Mole/Cell and the orthogonal matrix P: M_ours = P M_pyscf P^T.

    PySCF stores a shell with several contractions as [ctr0 m=-l..l, ctr1 m=-l..l, ...], so
    every contraction is one of our shells. Shell labels count per l (1s 2s 3s 2p 3p 3d ...),
    they only name the radial functions.
    """
    if getattr(mol, "cart", False):
        raise ValueError("DeepH-Zero needs spherical (not Cartesian) Gaussian basis functions")
    per_atom, _ = _shell_layout(mol)
    shells: dict[int, list[str]] = {}
    for z, ls in zip(numbers, per_atom):
        counts = dict.fromkeys(range(5), 0)
        names = []
        for l in ls:
            counts[l] += 1
            names.append(f"{l + counts[l]}{L_LETTERS[l]}")
        if int(z) in shells and shells[int(z)] != names:
            raise ValueError(f"atoms of element {z} carry different basis sets")
        shells[int(z)] = names
    basis = OrbitalBasis({int(z): s for z, s in shells.items()})
    blocks = [pyscf_to_ours(l) for ls in per_atom for l in ls]
    return basis, block_diag(*blocks)


class PySCFEngine:
    """PySCF Kohn-Sham DFT (RKS for molecules, KRKS with a k-mesh for periodic cells).

    Parameters
    ----------
    atoms: structure (Å). Molecules: no periodic direction. Periodic cells: pbc all True
        (2D materials as slabs with vacuum and a k-mesh (n, n, 1)).
    basis, xc, pseudo: PySCF names, e.g. "def2-svp", "PBE"; periodic: "gth-szv", "gth-pbe";
        ``basis`` may be a dict per element (PySCF's gth-szv lacks Mo, for example).
    kmesh: Monkhorst-Pack mesh (Gamma-centred, PySCF's ``make_kpts``) for periodic cells.
    grid_level: molecular DFT integration grid (PySCF ``grids.level``).
    ke_cutoff: plane-wave cutoff (Ha) of the periodic FFT grid; None = PySCF's default.
    charge: net charge (molecules).
    """

    def __init__(self, atoms: Atoms, basis: str | dict = "def2-svp", xc: str = "PBE", *,
                 pseudo: str | None = None, kmesh: tuple[int, int, int] = (1, 1, 1),
                 grid_level: int = 3, ke_cutoff: float | None = None, charge: int = 0,
                 verbose: int = 0):
        _require_pyscf()
        self.atoms = atoms.copy()
        self.xc = xc
        self.basis_name = basis
        self.pseudo = pseudo
        self.kmesh = tuple(int(k) for k in kmesh)
        self.grid_level = grid_level
        self.ke_cutoff = ke_cutoff
        self.charge = charge
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise StructureError("PySCFEngine supports molecules (pbc all False) or 3D cells "
                                 "(pbc all True; put 2D layers in a cell with vacuum)")
        self.periodic = bool(pbc.all())
        if self.periodic and abs(np.linalg.det(atoms.cell[:])) < 1e-6:
            raise StructureError("periodic structure without a cell")
        if len(atoms) > 1:
            d = atoms.get_all_distances(mic=self.periodic)
            d[np.diag_indices_from(d)] = np.inf
            if d.min() < 0.3:
                raise StructureError(f"atoms too close ({d.min():.3f} Å)")
        geom = [(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)]
        if self.periodic:
            from pyscf.pbc import dft as pdft
            from pyscf.pbc import gto as pgto
            kw = {"ke_cutoff": ke_cutoff} if ke_cutoff else {}
            cell = pgto.Cell(atom=geom, a=np.asarray(atoms.cell[:]), basis=basis,
                             pseudo=pseudo, unit="A", verbose=verbose, **kw)
            cell.build()
            self.mol = cell
            kabs = cell.make_kpts(self.kmesh)
            self.kpts_abs = kabs
            self.kpts = cell.get_scaled_kpts(kabs)
            self.mf = pdft.KRKS(cell, kpts=kabs, xc=xc)
        else:
            from pyscf import dft, gto
            mol = gto.M(atom=geom, basis=basis, unit="A", charge=charge, verbose=verbose,
                        ecp=pseudo)
            self.mol = mol
            self.kpts = np.zeros((1, 3))
            self.kpts_abs = None
            self.mf = dft.RKS(mol, xc=xc)
            self.mf.grids.level = grid_level
            self.mf.grids.build()
        self.nk = len(self.kpts)
        self.kweights = np.full(self.nk, 1.0 / self.nk)
        self.nelectron = float(self.mol.nelectron)
        self.orbital_basis, self._perm = pyscf_basis_and_permutation(
            self.mol, atoms.get_atomic_numbers())
        self.nao = int(self.mol.nao_nr())
        self._S = self._to_ours(self._raw(self.mf.get_ovlp()))
        self._h = self._to_ours(self._raw(self.mf.get_hcore()))

    # -- conversions -----------------------------------------------------------------
    def _raw(self, m) -> np.ndarray:
        """PySCF array(s) -> contiguous (nk, nao, nao) (PySCF returns Fortran-ordered arrays)."""
        m = np.asarray(m)
        if m.ndim == 2:
            m = m[None]
        return np.ascontiguousarray(m)

    def _to_ours(self, m: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._perm @ m @ self._perm.T)

    def _to_pyscf(self, m: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._perm.T @ m @ self._perm)

    def _dm_for_pyscf(self, dm: np.ndarray):
        d = self._to_pyscf(np.asarray(dm))
        if not self.periodic:
            return d[0].real if np.iscomplexobj(d) else d[0]
        return d.astype(np.complex128)

    # -- DFTEngine --------------------------------------------------------------------
    def overlap(self) -> np.ndarray:
        return self._S.copy()

    def core_hamiltonian(self) -> np.ndarray:
        return self._h.copy()

    def translation_error(self, shift=(0.37, 0.21, 0.13)) -> float:
        """max |h_ii(R=0)| change (Ha) of the core Hamiltonian's on-site diagonal when the
        whole cell is translated by ``shift`` (Å); 0 for molecules.

        PySCF evaluates the local pseudopotential on the FFT grid of ``ke_cutoff``; too
        coarse a grid makes matrix elements depend on where atoms sit relative to the grid
        (an "egg-box" effect). Measured at 20 Ha: bcc Na (q9, semicore 2s/2p) 80 eV, graphene
        2.3 eV -- no equivariant network can fit such an H. Graphene: 1.2 meV at 60 Ha.
        """
        if not self.periodic:
            return 0.0
        moved = self.atoms.copy()
        moved.translate(np.asarray(shift, dtype=float))
        moved.wrap()
        other = PySCFEngine(moved, basis=self.basis_name, xc=self.xc, pseudo=self.pseudo,
                            kmesh=self.kmesh, ke_cutoff=self.ke_cutoff)
        a = np.diag(np.mean(self._h, axis=0).real)
        b = np.diag(np.mean(other._h, axis=0).real)
        return float(np.abs(a - b).max())

    def overlap_truncation(self, cutoff: float) -> float:
        """max_k |S(k) - sum over atom pairs closer than ``cutoff`` (Å) of e^{2 pi i k.L} S_ij(L)|.

        How much of the basis overlap a model whose hoppings end at ``cutoff`` cannot
        represent (0 for molecules). H(R) decays like S(R), so a large value means no
        network with that cutoff can fit this engine's H(k): diffuse functions (Na gth-szv)
        still overlap 0.26 beyond 7 Å, which held the first bcc Na training at ~2 eV.
        """
        if not self.periodic:
            return 0.0
        from pyscf import gto

        cell = np.asarray(self.atoms.cell[:])
        vol = abs(np.linalg.det(cell))
        heights = [vol / np.linalg.norm(np.cross(cell[(a + 1) % 3], cell[(a + 2) % 3]))
                   for a in range(3)]
        nmax = [int(np.ceil(cutoff / h)) + 1 for h in heights]
        pos = self.atoms.positions
        sizes = [self.orbital_basis.norb(int(z)) for z in self.atoms.numbers]
        approx = np.zeros_like(self._S)
        mol = self.mol.copy()
        for shift in np.ndindex(*[2 * n + 1 for n in nmax]):
            L = np.array(shift) - np.array(nmax)
            d = np.linalg.norm(pos[None, :, :] + L @ cell - pos[:, None, :], axis=2)
            if d.min() >= cutoff:
                continue
            other = mol.copy()
            other.set_geom_(pos + L @ cell, unit="Angstrom")
            sr = self._perm @ gto.intor_cross("int1e_ovlp", mol, other) @ self._perm.T
            mask = np.repeat(np.repeat(d < cutoff, sizes, axis=0), sizes, axis=1)
            approx += np.exp(2j * np.pi * self.kpts @ L)[:, None, None] * (sr * mask)[None]
        return float(np.abs(self._S - approx).max())

    def energy_and_fock(self, dm: np.ndarray) -> tuple[float, np.ndarray]:
        d = self._dm_for_pyscf(dm)
        h1 = self.mf.get_hcore()
        vhf = self.mf.get_veff(self.mol, d)
        energy = float(np.real(self.mf.energy_tot(d, h1, vhf)))
        fock = self._to_ours(self._raw(np.asarray(h1) + np.asarray(vhf)))
        return energy, fock

    def response(self, mo_coeff: np.ndarray, mo_occ: np.ndarray):
        """Linear response dF = K[dD] of the Kohn-Sham matrix at the density of (C, occ).

        mo_coeff (nk, nao, nmo) in our order, mo_occ (nk, nmo) in [0, 2]. Returns a function
        mapping dD (nk, nao, nao) Hermitian -> dF (nk, nao, nao).
        """
        c = np.ascontiguousarray(self._perm.T @ mo_coeff)
        if self.periodic:
            vind = self.mf.gen_response(list(c), list(mo_occ), hermi=1)
        else:
            vind = self.mf.gen_response(c[0].real, mo_occ[0], hermi=1)

        def apply(dd: np.ndarray) -> np.ndarray:
            x = self._dm_for_pyscf(dd)
            return self._to_ours(self._raw(vind(x[None] if not self.periodic else x)))

        return apply

    def nuclear_repulsion(self) -> float:
        return float(self.mol.energy_nuc())

    def scf(self, sigma: float, conv_tol: float = 1e-11, max_cycle: int = 200) -> SCFResult:
        """Conventional SCF with Fermi-Dirac smearing ``sigma`` (Ha), the reference."""
        import time

        from pyscf.scf import addons

        mf = self.mf.copy() if hasattr(self.mf, "copy") else self.mf
        mf = addons.smearing(mf, sigma=sigma, method="fermi") if sigma > 0 else mf
        mf.conv_tol = conv_tol
        mf.conv_tol_grad = np.sqrt(conv_tol) * 0.1
        mf.max_cycle = max_cycle
        cycles = {"n": 0}

        def count(envs):
            cycles["n"] = envs.get("cycle", cycles["n"]) + 1

        mf.callback = count
        t0 = time.perf_counter()
        mf.kernel()
        seconds = time.perf_counter() - t0
        if not mf.converged:
            raise RuntimeError("reference SCF did not converge")
        dm = self._to_ours(self._raw(mf.make_rdm1()))
        energy, fock = self.energy_and_fock(dm)
        occ = np.asarray(mf.mo_occ, dtype=float).reshape(self.nk, -1) / 2.0
        occ = np.clip(occ, 1e-300, 1 - 1e-16)
        ent = -(occ * np.log(occ) + (1 - occ) * np.log1p(-occ))
        entropy = 2.0 * float(np.sum(self.kweights[:, None] * ent))
        mo_energy = np.asarray(mf.mo_energy, dtype=float).reshape(self.nk, -1)
        mu = fermi_level(mo_energy, self.kweights, self.nelectron, sigma) if sigma > 0 else np.nan
        return SCFResult(energy=energy, free_energy=energy - sigma * entropy, fock=fock, dm=dm,
                         mo_energy=mo_energy,
                         mu=mu, cycles=cycles["n"], seconds=seconds)

    def describe(self) -> dict:
        """Level of theory, JSON-able (recorded in checkpoints and benchmark output)."""
        return {"code": "pyscf", "xc": self.xc, "basis": self.basis_name, "pseudo": self.pseudo,
                "kmesh": list(self.kmesh) if self.periodic else None,
                "grid_level": None if self.periodic else self.grid_level,
                "ke_cutoff": self.ke_cutoff, "charge": self.charge, "periodic": self.periodic}


def engine_from_description(atoms: Atoms, desc: dict) -> PySCFEngine:
    """Rebuild an engine for ``atoms`` from :meth:`PySCFEngine.describe` output."""
    if desc.get("code", "pyscf") != "pyscf":
        raise ValueError(f"unknown DFT engine {desc.get('code')!r}")
    kw = {"pseudo": desc.get("pseudo"), "ke_cutoff": desc.get("ke_cutoff"),
          "charge": desc.get("charge", 0)}
    if desc.get("periodic"):
        kw["kmesh"] = tuple(desc.get("kmesh") or (1, 1, 1))
    else:
        kw["grid_level"] = desc.get("grid_level", 3)
    return PySCFEngine(atoms, basis=desc["basis"], xc=desc["xc"], **kw)


__all__ = ["DFTEngine", "PySCFEngine", "SCFResult", "HARTREE", "Bohr",
           "engine_from_description", "pyscf_basis_and_permutation"]
