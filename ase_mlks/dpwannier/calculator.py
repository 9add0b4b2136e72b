"""DPWannierCalc: ASE calculator for forces, stress and Wannier bands of (twisted) bilayers.

    atoms.calc = DPWannierCalc(model="mos2-bilayer")
    BFGS(atoms).run(fmax=0.01)
    bs = atoms.calc.band_structure(path=atoms.cell.bandpath("GMKG", npoints=120))

Reference level of theory of the shipped model: GPAW LCAO dzp PBE + D3(BJ) for energies,
forces and stress; Wannier H(R) in the Mo 4d + S 3p basis with energies vs the vacuum level
(GPAW's zero), so band energies come on GPAW's absolute scale.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as spla
import torch
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.dft.kpoints import BandPath
from ase.spectrum.band_structure import BandStructure
from ase.stress import full_3x3_to_voigt_6_stress

from ase_mlks.core.calculator import HamiltonianCalculator
from ase_mlks.core.hamiltonian import DENSE_LIMIT, TBHamiltonian

from .graph import DPGraph, check_structure, structure_graph
from .model import DPWannierModel


class DPWannierCalc(HamiltonianCalculator):
    """Deep-Potential force field + equivariant Wannier Hamiltonian (see module docstring).

    Args:
        model: shipped name ("mos2-bilayer"), checkpoint path, or a DPWannierModel.
        device: torch device ("cpu").
        kpts, nbands, sigma, width: electronic settings of ``HamiltonianCalculator``.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]
    model_class = DPWannierModel
    default_model = "mos2-bilayer"

    def __init__(self, model: str | DPWannierModel | None = None, device: str = "cpu",
                 **kwargs):
        super().__init__(model=model, device=device, **kwargs)
        # float64: forces must be the exact gradient of the energy for line searches and MD.
        self.model = self.model.double().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._graph: tuple[Atoms, DPGraph] | None = None

    # -- structure checks and graph ------------------------------------------------------
    def check_atoms(self, atoms: Atoms) -> None:
        super().check_atoms(atoms)
        check_structure(atoms, self.model.species, self.model.min_distance)

    def graph(self, atoms: Atoms) -> DPGraph:
        """Model graph of ``atoms`` (cached while positions, cell and numbers stay the same)."""
        if self._graph is not None:
            old, g = self._graph
            if (len(old) == len(atoms) and np.array_equal(old.numbers, atoms.numbers)
                    and np.array_equal(old.positions, atoms.positions)
                    and np.array_equal(old.cell, atoms.cell)):
                return g
        m = self.model
        g = structure_graph(atoms, m.species, m.rc, m.h_cutoff, m.areal_density,
                            m.min_distance).to(torch.float64, self.device)
        self._graph = (atoms.copy(), g)
        return g

    # -- ASE properties -----------------------------------------------------------------
    def calculate(self, atoms: Atoms | None = None, properties=("energy",),
                  system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        g = self.graph(self.atoms)
        want_stress = "stress" in properties
        out = self.model(g, forces=True, stress=want_stress)
        energy = float(out["energy"][0].detach())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["energies"].detach().cpu().numpy().copy(),
            "forces": out["forces"].detach().cpu().numpy().copy(),
        }
        if want_stress:
            s = out["stress"][0].detach().cpu().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(s)

    def get_raer(self, atoms: Atoms | None = None) -> np.ndarray:
        """Reduced atomic-environment representation (natoms, RAER size)."""
        atoms = self.atoms if atoms is None else atoms
        with torch.no_grad():
            out = self.model(self.graph(atoms), forces=False)
        return out["raer"].cpu().numpy()

    # -- Hamiltonian ---------------------------------------------------------------------
    def build_hamiltonian(self, atoms: Atoms) -> TBHamiltonian:
        """Model H(R) as a sparse TBHamiltonian (eV vs vacuum, core orbital order)."""
        m = self.model
        g = self.graph(atoms)
        with torch.no_grad():
            out = m(g, forces=False, hamiltonian=True)
        species = g.species.cpu().numpy()
        norb = np.asarray(m.norb)[species]
        offsets = np.concatenate([[0], np.cumsum(norb)])
        rows, cols, vals, rvecs = [], [], [], []

        def add(blocks: np.ndarray, ai: np.ndarray, aj: np.ndarray, shifts: np.ndarray) -> None:
            for si in range(len(m.species)):
                for sj in range(len(m.species)):
                    sel = np.nonzero((species[ai] == si) & (species[aj] == sj))[0]
                    if not len(sel):
                        continue
                    ni, nj = m.norb[si], m.norb[sj]
                    a, b = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
                    rows.append((offsets[ai[sel]][:, None] + a.ravel()[None]).ravel())
                    cols.append((offsets[aj[sel]][:, None] + b.ravel()[None]).ravel())
                    vals.append(blocks[sel][:, :ni, :nj].reshape(len(sel), -1).ravel())
                    rvecs.append(np.repeat(shifts[sel], ni * nj, axis=0))

        n = len(species)
        idx = np.arange(n)
        add(out["onsite"].cpu().numpy(), idx, idx, np.zeros((n, 3), dtype=np.int64))
        add(out["hop"].cpu().numpy(), g.h_i.cpu().numpy(), g.h_j.cpu().numpy(),
            g.h_shift.cpu().numpy().round().astype(np.int64))
        nel = float(sum(m.manifold_electrons[m.species[s]] for s in species))
        return TBHamiltonian.from_coo(
            atoms.cell[:], int(offsets[-1]), np.concatenate(rvecs), np.concatenate(rows),
            np.concatenate(cols), np.concatenate(vals),
            orbital_atoms=np.repeat(idx, norb), nelectrons=nel, pbc=atoms.pbc)

    def get_fermi_level(self) -> float:
        """Fermi level (eV). Small cells: smeared count on a k-mesh (core). Cells above
        ``DENSE_LIMIT`` orbitals: the middle of the Γ-point gap from one real symmetric
        diagonalization of the states around the highest occupied one."""
        ham = self.get_hamiltonian()
        if ham.norb <= DENSE_LIMIT:
            return super().get_fermi_level()
        if "fermi_level" not in self._electronic:
            hk = ham.hk(np.zeros(3)).real  # H(R) real -> H(Γ) real symmetric
            nocc = int(round(ham.nelectrons / 2))
            e = scipy.linalg.eigh(hk, eigvals_only=True, subset_by_index=[nocc - 1, nocc],
                                  driver="evr")
            self._electronic["fermi_level"] = float(0.5 * (e[0] + e[1]))
        return self._electronic["fermi_level"]

    def band_structure(self, path: BandPath | str | None = None, npoints: int = 100,
                       nbands: int | None = None, sigma: float | None = None,
                       reference: float | None = None) -> BandStructure:
        """Band structure along ``path`` (see ``HamiltonianCalculator.band_structure``).

        Cells above ``DENSE_LIMIT`` orbitals get the ``nbands`` (default 20) states nearest
        ``sigma`` (default: the Fermi level) from :func:`eigenvalues_near`.
        """
        ham = self.get_hamiltonian()
        if ham.norb <= DENSE_LIMIT:
            return super().band_structure(path, npoints, nbands, sigma, reference)
        if path is None:
            path = self.parameters.get("kpts")
        elif isinstance(path, str):
            path = self.atoms.cell.bandpath(path, npoints=npoints, pbc=self.atoms.pbc)
        if not isinstance(path, BandPath):
            raise TypeError("give a BandPath (or a special-point string) for the bands")
        if reference is None:
            reference = self.get_fermi_level()
        sigma = reference if sigma is None else sigma
        eps = eigenvalues_near(ham, path.kpts, nbands or 20, sigma)
        return BandStructure(path=path, energies=eps[None], reference=reference)


def eigenvalues_near(ham: TBHamiltonian, kpts, nbands: int, sigma: float) -> np.ndarray:
    """The ``nbands`` eigenvalues nearest ``sigma`` (eV) at each k, shape (nk, nbands).

    Shift-invert Lanczos whose inverse comes from a dense LU factorization (LAPACK
    zgetrf, blocked): a moiré cell's H(k) couples every atom to ~100 neighbours, so a
    sparse LU fills in almost completely and is slower than the dense one; the Lanczos
    iterations then only back-substitute.
    """
    out = []
    for k in np.atleast_2d(kpts):
        hk = ham.hk(k)
        lu = scipy.linalg.lu_factor(hk - sigma * np.eye(ham.norb), check_finite=False)

        def solve(x, lu=lu):
            return scipy.linalg.lu_solve(lu, x, check_finite=False)

        op = spla.LinearOperator(hk.shape, matvec=solve, matmat=solve, dtype=complex)
        e = spla.eigsh(hk, k=nbands, sigma=sigma, OPinv=op, which="LM",
                       return_eigenvectors=False, tol=1e-10)
        out.append(np.sort(e.real))
    return np.array(out)
