"""DeepHZeroCalc: the ASE calculator of DeepH-Zero networks.

    from ase.build import molecule
    from ase_mlks.deephzero import DeepHZeroCalc
    atoms = molecule("H2O")
    atoms.calc = DeepHZeroCalc(model="h2o-pbe-svp")
    atoms.calc.get_homo_lumo()          # eV, from H_theta and the basis overlap
    atoms.get_potential_energy()        # E[D(H_theta)] in eV, through the DFT engine (PySCF)

The Hamiltonian comes from the network alone; the overlap S is the basis set's (analytic
Gaussian integrals, computed by PySCF's integral library, no DFT). ``energy`` is the DFT
energy of the density D(H_theta) of the network's Hamiltonian -- variational, so it is above
the SCF energy -- and needs the engine; ``free_energy`` is E - sigma S with the model's
smearing. Periodic cells: ``band_structure()`` along an ASE ``BandPath``, ``kpts`` mesh for
eigenvalues and the Fermi level (``HamiltonianCalculator``).
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import all_changes

from ..core.calculator import HamiltonianCalculator
from ..core.errors import AseMlksError, StructureError
from ..core.hamiltonian import TBHamiltonian
from .engine import HARTREE, engine_from_description
from .model import DeepHE3, build_graph


def _basis_mol(atoms: Atoms, desc: dict):
    """PySCF Mole/Cell of ``atoms`` with the model's basis (no DFT objects)."""
    try:
        from pyscf import gto
        from pyscf.pbc import gto as pgto
    except ImportError as err:
        raise ImportError("DeepHZeroCalc needs PySCF for the basis overlap: "
                          "pip install 'ase_mlks[pyscf]'") from err
    geom = [(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)]
    if desc.get("periodic"):
        kw = {"ke_cutoff": desc["ke_cutoff"]} if desc.get("ke_cutoff") else {}
        cell = pgto.Cell(atom=geom, a=np.asarray(atoms.cell[:]), basis=desc["basis"],
                         pseudo=desc.get("pseudo"), unit="A", verbose=0, **kw)
        cell.build()
        return cell
    return gto.M(atom=geom, basis=desc["basis"], unit="A", verbose=0,
                 charge=desc.get("charge", 0), ecp=desc.get("pseudo"))


def _overlap_shifts(mol) -> np.ndarray:
    """Integer lattice vectors (n, 3) within the basis' overlap range (none for molecules)."""
    if not hasattr(mol, "get_lattice_Ls"):
        return np.zeros((0, 3), dtype=int)
    frac = np.linalg.solve(mol.lattice_vectors().T, mol.get_lattice_Ls().T).T
    return np.rint(frac).astype(int)


class DeepHZeroCalc(HamiltonianCalculator):
    """ASE calculator: H_theta from a DeepH-Zero network (see module docstring).

    Parameters: ``model`` (shipped name such as "h2o-pbe-svp", a path, or a ``DeepHE3``),
    ``kpts`` (mesh, dict or BandPath), ``width`` (Fermi smearing, eV) as in
    ``HamiltonianCalculator``.
    """

    implemented_properties = ["energy", "free_energy"]
    model_class = DeepHE3
    default_model = "h2o-pbe-svp"

    def check_atoms(self, atoms: Atoms) -> None:
        super().check_atoms(atoms)
        self.model.basis.check_elements(atoms.numbers)
        desc = self.model.engine_description or {}
        periodic = bool(np.any(atoms.pbc))
        if periodic != bool(desc.get("periodic")):
            kind = "periodic cells" if desc.get("periodic") else "molecules"
            raise StructureError(f"this model was trained on {kind}; got pbc={atoms.pbc}")
        if periodic and not np.all(atoms.pbc):
            raise StructureError("periodic models need pbc=(True, True, True)")
        if len(atoms) > 1:
            d = atoms.get_all_distances(mic=periodic)
            d[np.diag_indices_from(d)] = np.inf
            if d.min() < 0.5:
                raise StructureError(f"atoms too close ({d.min():.3f} Å)")

    # -- Hamiltonian ------------------------------------------------------------------
    def _blocks(self, atoms: Atoms):
        g = build_graph([atoms], self.model.cutoff, self.model.species)
        with torch.no_grad():
            onsite, hops = self.model(g)
        return g, onsite, hops

    def build_hamiltonian(self, atoms: Atoms) -> TBHamiltonian:
        """H(R) in eV (dense per lattice vector R), S(R) from the basis, electron count."""
        from .engine import pyscf_basis_and_permutation

        desc = self.model.engine_description or {}
        basis = self.model.basis
        g, onsite, hops = self._blocks(atoms)
        off = basis.orbital_offsets(atoms.numbers)
        n = int(off[-1])
        mol = _basis_mol(atoms, desc)
        # S(R) over every lattice vector the basis functions reach (PySCF's own lattice sum,
        # as the engine's S(k)), not only those of the network's hoppings: truncating S with
        # H's R set would make the bands depend on the cell chosen for the crystal.
        shifts = np.unique(np.concatenate([np.zeros((1, 3), int), g.shifts,
                                           _overlap_shifts(mol)]), axis=0)
        rindex = {tuple(r): k for k, r in enumerate(shifts)}
        H = np.zeros((len(shifts), n, n))
        r0 = rindex[(0, 0, 0)]
        for a in range(len(atoms)):
            sl = slice(off[a], off[a + 1])
            H[r0, sl, sl] += onsite[a].numpy()
        src, dst = g.src.numpy(), g.dst.numpy()
        for e in range(len(src)):
            si, sj = slice(off[src[e]], off[src[e] + 1]), slice(off[dst[e]], off[dst[e] + 1])
            H[rindex[tuple(g.shifts[e])], si, sj] += hops[e].numpy()
        # Hermitian: H_ij(R) = H_ji(-R)^T, averaged like the network's H(k) = (H + H^H) / 2
        Hs = np.zeros_like(H)
        for k, r in enumerate(shifts):
            Hs[k] = 0.5 * (H[k] + H[rindex[tuple(-r)]].T)
        _, perm = pyscf_basis_and_permutation(mol, atoms.numbers)
        S = np.stack([perm @ self._overlap(mol, atoms, r) @ perm.T for r in shifts])
        return TBHamiltonian.from_dense(
            np.asarray(atoms.cell[:]), shifts, Hs * HARTREE, S,
            orbital_atoms=basis.orbital_atoms(atoms.numbers),
            nelectrons=float(mol.nelectron), pbc=atoms.pbc)

    @staticmethod
    def _overlap(mol, atoms: Atoms, shift) -> np.ndarray:
        """<phi_i(0)|phi_j(R)> for lattice vector ``shift`` (PySCF order)."""
        from pyscf import gto

        if not np.any(shift):
            return np.ascontiguousarray(gto.intor_cross("int1e_ovlp", mol, mol))
        other = mol.copy()
        other.set_geom_(atoms.positions + np.asarray(shift) @ atoms.cell[:], unit="Angstrom")
        return np.ascontiguousarray(gto.intor_cross("int1e_ovlp", mol, other))

    def get_overlap(self, atoms: Atoms | None = None):
        """(R (nR, 3), S(R) (nR, norb, norb)) of the basis, our orbital order."""
        ham = self.get_hamiltonian(atoms)
        return ham.R.copy(), ham.to_dense_R("s")

    # -- energy through the engine ---------------------------------------------------
    def calculate(self, atoms: Atoms | None = None, properties=("energy",),
                  system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        desc = self.model.engine_description
        if not desc:
            raise AseMlksError("the model records no DFT engine; cannot evaluate E[H]")
        try:
            engine = engine_from_description(self.atoms, desc)
        except ImportError as err:
            raise AseMlksError(
                "energy = E[D(H_theta)] needs the DFT engine (PySCF): pip install "
                "'ase_mlks[pyscf]'; the Hamiltonian, eigenvalues and bands work without "
                "energies") from err
        from .variational import FreeEnergy

        fe = FreeEnergy(engine, sigma=self.model.sigma, sc_weight=0.0)
        g = build_graph([self.atoms], self.model.cutoff, self.model.species)
        kpts = [engine.kpts] if engine.periodic else None
        with torch.no_grad():
            h = self.model.hamiltonian_k(g, kpts)[0]
        terms = fe.evaluate(h)
        self.results["energy"] = terms.energy * HARTREE
        self.results["free_energy"] = float(terms.free_energy.detach()) * HARTREE


__all__ = ["DeepHZeroCalc"]
