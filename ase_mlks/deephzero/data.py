"""Structures for DeepH-Zero: distorted water molecules and rattled periodic cells, plus an
HDF5 cache of SCF references (used only for evaluation and supervised baselines).

Geometries are generated from a seed, so a training set is reproducible from its command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from scipy.spatial.transform import Rotation

from ..core.errors import AseMlksError
from .engine import PySCFEngine

SCALARS = ("free_energy", "energy", "mu", "scf_seconds")


def distorted_water(n: int, seed: int = 0, bond: tuple[float, float] = (0.88, 1.12),
                    angle: tuple[float, float] = (92.0, 118.0)) -> list[Atoms]:
    """``n`` water molecules: O-H lengths uniform in ``bond`` (Å), H-O-H angle uniform in
    ``angle`` (degrees), random orientation, centred at the origin."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r1, r2 = rng.uniform(*bond, size=2)
        th = np.radians(rng.uniform(*angle))
        pos = np.array([[0.0, 0.0, 0.0], [r1, 0.0, 0.0], [r2 * np.cos(th), r2 * np.sin(th), 0.0]])
        pos = pos - pos.mean(axis=0)
        rot = Rotation.random(random_state=rng.integers(2**31)).as_matrix()
        out.append(Atoms("OH2", positions=pos @ rot.T))
    return out


def rattled_bcc_na(n: int, seed: int = 0, a: float = 4.23, rattle: float = 0.15,
                   strain: float = 0.03) -> list[Atoms]:
    """``n`` bcc Na cubic cells (2 atoms) with random strain and Gaussian displacements (Å)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Na", "bcc", a=a, cubic=True)
        eps = rng.uniform(-strain, strain, size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        out.append(atoms)
    return out


def rattled_graphene(n: int, seed: int = 0, a: float = 2.46, vacuum: float = 5.0,
                     rattle: float = 0.05, strain: float = 0.03) -> list[Atoms]:
    """``n`` graphene primitive cells (2 atoms, ``vacuum`` Å each side, pbc all True) with
    random in-plane strain (|e| <= ``strain``) and Gaussian displacements (Å, also along z)."""
    from ase.build import graphene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = graphene(a=a, vacuum=vacuum)
        atoms.pbc = True
        eps = np.zeros((3, 3))
        e2 = rng.uniform(-strain, strain, size=(2, 2))
        eps[:2, :2] = 0.5 * (e2 + e2.T)
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        out.append(atoms)
    return out


def scf_references(structures: list[Atoms], engine_kwargs: dict, sigma: float,
                   path: str | Path | None = None, progress: bool = True) -> list[dict]:
    """SCF reference (H_scf, S, D, energies) per structure; cached in an HDF5 file at ``path``
    (one group per structure, written atomically; resumable)."""
    from tqdm.auto import tqdm

    from ..core.dataset import StructureDataset

    ds = StructureDataset(path, mode="a") if path is not None else None
    # the cache is keyed by position; the settings are checked so that a file written at
    # another k-mesh, cutoff or smearing is never read as this reference
    settings = json.dumps({**engine_kwargs, "sigma": sigma}, sort_keys=True, default=list)
    out = []
    for idx, atoms in enumerate(tqdm(structures, desc="SCF references", disable=not progress)):
        key = f"s{idx:05d}"
        if ds is not None and key in ds:
            rec = ds.read(key)
            stored = rec["attrs"].get("engine")
            if stored is not None and stored != settings:
                raise AseMlksError(
                    f"{path}: reference {key} was computed with other engine settings "
                    f"({stored}, not {settings}); delete the file or use another path")
            if np.allclose(rec["atoms"].positions, atoms.positions, atol=1e-5):
                attrs = rec.pop("attrs")
                rec.pop("atoms")
                rec.update({k: float(attrs[k]) for k in SCALARS})
                out.append(rec)
                continue
        eng = PySCFEngine(atoms, **engine_kwargs)
        ref = eng.scf(sigma)
        arrays = {"fock": ref.fock, "overlap": eng.overlap(), "dm": ref.dm,
                  "mo_energy": ref.mo_energy}
        # energies (Ha, ~1e2) need float64: kept as attributes, arrays as float32
        scalars = {"free_energy": ref.free_energy, "energy": ref.energy, "mu": ref.mu,
                   "scf_seconds": ref.seconds, "engine": settings}
        if ds is not None:
            ds.append(key, atoms, metadata=scalars, **arrays)
        out.append({**arrays, **scalars})
    return out


__all__ = ["distorted_water", "rattled_bcc_na", "rattled_graphene", "scf_references"]
