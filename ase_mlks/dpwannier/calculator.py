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
import torch
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ase_mlks.core.calculator import HamiltonianCalculator
from ase_mlks.core.hamiltonian import TBHamiltonian

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


def eigenvalues_near(ham: TBHamiltonian, kpts, nbands: int, sigma: float) -> np.ndarray:
    """The ``nbands`` eigenvalues nearest ``sigma`` (eV) at each k, shape (nk, nbands), by
    the core's dense-factorization shift-invert solver (``TBHamiltonian.eigenvalues``)."""
    return ham.eigenvalues(kpts, nbands=nbands, sigma=sigma, solver="shift-invert")
