"""GPAW reference HDF5 (``ase_mlks.reference``) -> DPWannier training samples.

Each structure group holds the structure, ``energy`` (eV, GPAW + D3), ``forces`` (eV/Å),
optionally ``stress`` (Voigt, eV/Å^3) and a nested ``TBHamiltonian`` group (Wannier H(R),
Mo 4d + S 3p, eV vs vacuum; see docs/reference.md). A sample packs the model's graph with
the matching targets: on-site blocks H_ii(0) and hopping blocks H_ij(R) of every hopping
edge (i, j, R) of the graph. The reference stores only |H| >= 1 meV (the paper's threshold),
so an element or a whole R missing from it is a zero target; its Wannier grid (6x6 k for
the 2x2 cells) puts the Wigner-Seitz range (~19 Å) far beyond the hopping cutoff, so every
edge inside the cutoff has a unique reference value. ``hop_mask`` (all True here) lets
other data sets exclude edges they cannot represent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from ase_mlks.core.dataset import StructureDataset
from ase_mlks.core.errors import AseMlksError
from ase_mlks.core.hamiltonian import TBHamiltonian

from .graph import DPGraph, batch_graphs, structure_graph

TB_FORMAT = "ase_mlks.TBHamiltonian/1"


@dataclass
class Sample:
    """One structure (or a batch of them) with its reference targets (float64 tensors)."""

    graph: DPGraph
    energy: torch.Tensor                     # (B,) eV
    forces: torch.Tensor                     # (N, 3) eV/Å
    stress: torch.Tensor | None = None       # (B, 3, 3) eV/Å^3
    onsite: torch.Tensor | None = None       # (N, nmax, nmax) eV
    hop: torch.Tensor | None = None          # (H, nmax, nmax) eV
    hop_mask: torch.Tensor | None = None     # (H,) bool
    nelectrons: float | None = None          # electrons in the reference Wannier manifold
    eig_ref: list | None = None              # per structure: (nk, nb) DFT bands (eV)
    eig_kpts: list | None = None             # per structure: (nk, 3) fractional k
    eig_weights: list | None = None          # per structure: (nk,) k weights
    keys: list[str] = field(default_factory=list)


def kpoint_density(group: h5py.Group) -> float | None:
    """How finely the record's reference sampled the Brillouin zone: the smallest k_i·|a_i|
    (Å) over its periodic directions, from the k-grid in its ``settings`` attribute. It is
    comparable across cell sizes (a 2x2 MoS2 cell at 3x3 k and the 21.79° cell at 2x2 k: 19
    and 17 Å). None when the record does not say."""
    raw = group.attrs.get("settings")
    kpts = json.loads(raw).get("kpts") if raw is not None else None
    if not kpts:
        return None
    cell, pbc = np.asarray(group["cell"]), np.asarray(group["pbc"])
    lengths = [k * float(np.linalg.norm(cell[i])) for i, k in enumerate(kpts[:3]) if pbc[i]]
    return min(lengths) if lengths else None


def find_hamiltonian_group(group: h5py.Group) -> h5py.Group | None:
    """The structure's Wannier TBHamiltonian group ('wannier'; None if there is none).

    Other TB groups (e.g. 'ao', GPAW's atomic-orbital H(R)) are a different basis.
    """
    obj = group.get("wannier")
    if isinstance(obj, h5py.Group) and obj.attrs.get("format", "") == TB_FORMAT:
        return obj
    return None


def hamiltonian_targets(ham: TBHamiltonian, graph: DPGraph, norb: Sequence[int], nmax: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded on-site (N, nmax, nmax), hopping (H, nmax, nmax) targets and hop mask (H,).

    ``norb[s]`` is the orbital count of species index ``s``; orbitals of an atom are
    contiguous in the reference (checked through ``ham.orbital_atoms`` when present).
    """
    species = graph.species.numpy()
    sizes = np.asarray(norb)[species]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] != ham.norb:
        raise AseMlksError(f"reference H has {ham.norb} orbitals, the model's basis gives "
                           f"{offsets[-1]} for this structure")
    if ham.orbital_atoms is not None and not np.array_equal(
            ham.orbital_atoms, np.repeat(np.arange(len(species)), sizes)):
        raise AseMlksError("reference orbital order does not follow the atom order")
    dense = ham.to_dense_R().real
    r_lookup = {tuple(int(x) for x in r): n for n, r in enumerate(ham.R)}
    n = len(species)
    onsite = np.zeros((n, nmax, nmax))
    r0 = r_lookup.get((0, 0, 0))
    if r0 is None:
        raise AseMlksError("reference H has no R = 0 block")
    for a in range(n):
        k = sizes[a]
        onsite[a, :k, :k] = dense[r0, offsets[a]:offsets[a] + k, offsets[a]:offsets[a] + k]
    hi, hj = graph.h_i.numpy(), graph.h_j.numpy()
    shifts = graph.h_shift.numpy().round().astype(int)
    hop = np.zeros((len(hi), nmax, nmax))
    mask = np.zeros(len(hi), dtype=bool)
    for e, (i, j, s) in enumerate(zip(hi, hj, shifts)):
        mask[e] = True
        r = r_lookup.get(tuple(s))
        if r is None:  # every element of this R fell below the storage threshold
            continue
        hop[e, :sizes[i], :sizes[j]] = dense[r, offsets[i]:offsets[i] + sizes[i],
                                             offsets[j]:offsets[j] + sizes[j]]
    return onsite, hop, mask


class DPWannierData(torch.utils.data.Dataset):
    """Samples from a reference HDF5 for a model's cutoffs and basis (cached in memory)."""

    def __init__(self, path: str | os.PathLike, keys: Sequence[str] | None, model,
                 hamiltonian: bool = True):
        self.path = Path(path)
        with StructureDataset(self.path, "r") as ds:
            self.keys = list(keys) if keys is not None else sorted(ds.keys())
        self.model = model
        self.hamiltonian = hamiltonian
        self._cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Sample:
        if index not in self._cache:
            with StructureDataset(self.path, "r") as ds:
                self._cache[index] = make_sample(ds, self.keys[index], self.model,
                                                 self.hamiltonian)
        return self._cache[index]


def make_sample(ds: StructureDataset, key: str, model, hamiltonian: bool = True) -> Sample:
    """Read one structure group and build its graph and targets."""
    rec = ds.read(key)
    atoms: Atoms = rec["atoms"]
    g = structure_graph(atoms, model.species, model.rc, model.h_cutoff, model.areal_density)
    stress = None
    if "stress" in rec and np.all(np.isfinite(rec["stress"])):
        s = np.asarray(rec["stress"], float)
        s = voigt_6_to_full_3x3_stress(s) if s.shape == (6,) else s.reshape(3, 3)
        stress = torch.as_tensor(s[None])
    sample = Sample(graph=g, energy=torch.tensor([float(rec["energy"])], dtype=torch.float64),
                    forces=torch.as_tensor(np.asarray(rec["forces"], float)), stress=stress,
                    keys=[key])
    if hamiltonian and "eigenvalues" in rec and "ibz_kpts" in rec:
        # DFT bands of the manifold: skip the per-atom core bands, keep the occupied
        # manifold and the lowest conduction bands (model band b <-> DFT band off + b).
        sym = atoms.get_chemical_symbols()
        off = sum(model.core_bands[x] for x in sym)
        nb = int(round(sum(model.manifold_electrons[x] for x in sym) / 2)) + sum(
            model.fit_conduction_bands[x] for x in sym)
        eps = np.asarray(rec["eigenvalues"], float)
        if eps.shape[1] >= off + nb:
            w = np.asarray(rec.get("kweights", np.ones(len(eps))), float)
            sample.eig_ref = [torch.as_tensor(eps[:, off:off + nb])]
            sample.eig_kpts = [torch.as_tensor(np.asarray(rec["ibz_kpts"], float))]
            sample.eig_weights = [torch.as_tensor(w / w.sum())]
    if hamiltonian:
        hg = find_hamiltonian_group(ds.group(key))
        if hg is not None:
            ham = TBHamiltonian.from_hdf5(hg)
            on, hop, mask = hamiltonian_targets(ham, g, model.norb, model.nmax)
            sample.onsite = torch.as_tensor(on)
            sample.hop = torch.as_tensor(hop)
            sample.hop_mask = torch.as_tensor(mask)
            sample.nelectrons = ham.nelectrons
    return sample


def collate(samples: Sequence[Sample]) -> Sample:
    """Batch samples (graph indices offset; targets concatenated)."""
    def cat(name):
        vals = [getattr(s, name) for s in samples]
        return None if any(v is None for v in vals) else torch.cat(vals)

    def lst(name):
        vals = [getattr(s, name) for s in samples]
        return None if any(v is None for v in vals) else [x for v in vals for x in v]

    return Sample(graph=batch_graphs([s.graph for s in samples]),
                  energy=torch.cat([s.energy for s in samples]),
                  forces=torch.cat([s.forces for s in samples]),
                  stress=cat("stress"), onsite=cat("onsite"), hop=cat("hop"),
                  hop_mask=cat("hop_mask"), keys=[k for s in samples for k in s.keys],
                  eig_ref=lst("eig_ref"), eig_kpts=lst("eig_kpts"),
                  eig_weights=lst("eig_weights"))


def split_keys(path: str | os.PathLike, fraction: float = 0.8, seed: int = 0,
               prefix: str | None = None) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split (``StructureDataset.split``), optional key prefix."""
    with StructureDataset(path, "r") as ds:
        keys = sorted(k for k in ds.keys() if prefix is None or k.startswith(prefix))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(keys))
    n = int(round(fraction * len(keys)))
    return [keys[i] for i in sorted(perm[:n])], [keys[i] for i in sorted(perm[n:])]


def merge_datasets(output: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Path:
    """Copy the complete structures of several reference files into one (atomically).

    Keys become ``<file stem>/<key>``-free names ``<file stem>:<key>`` so that structures
    of different files never collide. Returns the output path.
    """
    from ase_mlks.core.io import atomic_path

    output = Path(output)
    with atomic_path(output) as tmp, h5py.File(tmp, "w") as out:
        for path in inputs:
            with StructureDataset(path, "r") as ds:
                src = ds.group(ds.keys()[0]).file if ds.keys() else None
                for key in ds.keys():
                    src.copy(src[key], out, name=f"{Path(path).stem}:{key}")
    return output
