"""Data preparation for the GW post-processor (Hou, Wu & Qiu 2024).

Turns Kohn–Sham states of a 2D material into the arrays the crystal VAE reads:

* ``|psi_nk(r)|`` on the unit cell's real-space grid (GPAW ``get_pseudo_wave_function``),
  in Å^-3/2. The in-plane grid is kept as computed (the encoder accepts any size); only the
  vacuum direction is resampled, onto a fixed window of ``nz`` points centred on the layer,
  because the architecture treats those ``nz`` z-slices as input channels (Table 1: 40).
* pseudobands "super states": ``sqrt(sum_{nk in slice} w_k |psi_nk|^2 / sum w_k)`` for
  energy slices below and above the Fermi level (an energy-resolved partial density's
  square root, i.e. the modulus a random-phase superposition has on average).
* the pseudo valence density.

Arrays are channels-first, ``(nz, n1, n2)``: index 1 runs along lattice vector a1, index 2
along a2 (crystal coordinates, as in the paper's Fig. 2a).

Sources: a live GPAW calculator (inference and development data) or the project's reference
HDF5 (``data/gw_monolayers.h5``, schema in docs/reference.md).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from ase import Atoms

from ase_mlks.core.errors import StructureError
from ase_mlks.core.io import atomic_path, read_array, write_array
from ase_mlks.reference.kohnsham import (
    non_scf,
    pseudo_density,
    pw_ground_state,
    wavefunction_moduli,
)
from ase_mlks.structures import monolayer

NZ = 40  # z-slices = input channels of the first convolution (Table 1: 115,520 = 320*(9*40+1))
Z_WINDOW = 10.0  # Å of the vacuum direction kept around the layer centre
# Energy slice edges (eV, relative to the Fermi level) of the pseudobands super states:
# three occupied slices and three empty ones.
SUPER_EDGES = (-9.0, -6.0, -3.0, 0.0, 3.0, 6.0, 9.0)


def check_slab(atoms: Atoms) -> None:
    """Raise StructureError unless ``atoms`` is a 2D slab: periodic in-plane, a3 along z."""
    if atoms.cell.rank < 3:
        raise StructureError(
            "GW post-processor needs a full 3D cell (vacuum along z); cell is missing")
    if not (atoms.pbc[0] and atoms.pbc[1]):
        raise StructureError("GW post-processor needs a 2D material periodic along a1 and a2")
    cell = atoms.cell.array
    if abs(cell[0, 2]) > 1e-6 or abs(cell[1, 2]) > 1e-6 or np.linalg.norm(cell[2, :2]) > 1e-6:
        raise StructureError(
            "GW post-processor needs in-plane a1, a2 (z components 0) and a3 along z; got cell "
            f"{cell.tolist()}"
        )


def layer_center(atoms: Atoms) -> float:
    """Centre of the layer along z (Å), as a circular mean so slabs across z=0 work too."""
    c = atoms.cell[2, 2]
    phase = np.exp(2j * np.pi * atoms.positions[:, 2] / c)
    return float(np.angle(phase.mean()) / (2 * np.pi) * c % c)


def window_z(grid: np.ndarray, c: float, z_center: float, nz: int = NZ,
             window: float = Z_WINDOW) -> np.ndarray:
    """Resample a periodic grid ``(n1, n2, n3)`` along z onto ``nz`` points of a window.

    Grid point j of the input sits at z = j*c/n3 (GPAW's convention). Periodic linear
    interpolation; returns channels-first ``(nz, n1, n2)``.
    """
    n3 = grid.shape[2]
    z = z_center - window / 2 + (np.arange(nz) + 0.5) * window / nz
    t = (z / c * n3) % n3
    j0 = np.floor(t).astype(int)
    f = (t - j0)[None, None, :]
    out = (1 - f) * grid[:, :, j0 % n3] + f * grid[:, :, (j0 + 1) % n3]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


@dataclass
class GridSpec:
    """How 3D cell grids are turned into ``(nz, n1, n2)`` channel stacks."""

    nz: int = NZ
    window: float = Z_WINDOW

    def apply(self, grid: np.ndarray, atoms: Atoms) -> np.ndarray:
        return window_z(grid, atoms.cell[2, 2], layer_center(atoms), self.nz, self.window)


@dataclass
class MaterialStates:
    """KS data of one 2D material (one spin channel set, one k-point set).

    kpts (nk, 3) fractional; weights (nk,); eigenvalues (ns, nk, nb_all) eV;
    bands (nsel,) band indices whose moduli are stored; moduli (ns, nk, nsel, nz, n1, n2)
    Å^-3/2; density (nz, n1, n2) Å^-3; super_moduli (nsup, nz, n1, n2) Å^-3/2;
    super_energies (nsup,) eV relative to the Fermi level; super_counts (nsup,) number of
    states (weighted) in each slice.
    """

    name: str
    atoms: Atoms
    kpts: np.ndarray
    weights: np.ndarray
    eigenvalues: np.ndarray
    fermi_level: float
    nvalence: float
    bands: np.ndarray
    moduli: np.ndarray
    density: np.ndarray | None = None
    super_moduli: np.ndarray | None = None
    super_energies: np.ndarray | None = None
    super_counts: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def nocc(self) -> int:
        """Number of doubly occupied bands of an insulator (nvalence/2)."""
        return int(round(self.nvalence / 2))


# --------------------------------------------------------------------------- GPAW side


def _eigenvalues(calc) -> np.ndarray:
    ns = calc.get_number_of_spins()
    nk = len(calc.get_ibz_k_points())
    return np.array([[calc.get_eigenvalues(kpt=k, spin=s) for k in range(nk)] for s in range(ns)])


def state_moduli(calc, bands: Sequence[int], spec: GridSpec | None = None,
                 kpt_indices: Sequence[int] | None = None) -> np.ndarray:
    """|psi_nk| of ``bands`` at the calculator's k-points: (ns, nk, nb, nz, n1, n2), Å^-3/2."""
    spec = spec or GridSpec()
    atoms = calc.get_atoms()
    check_slab(atoms)
    out = [[[spec.apply(m, atoms) for m in per_k]
            for per_k in wavefunction_moduli(calc, bands, kpt_indices, half_width=None, spin=s)]
           for s in range(calc.get_number_of_spins())]
    return np.asarray(out, dtype=np.float32)


def super_states(calc, spec: GridSpec | None = None, edges: Sequence[float] = SUPER_EDGES,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudobands super states of a uniform-k-grid calculator.

    Returns (moduli (nsup, nz, n1, n2) Å^-3/2, mean energies (nsup,) eV relative to E_F,
    weighted state counts (nsup,)). A slice with no state gives zeros and its centre energy.
    Exact for a full k-grid (symmetry off); with IBZ k-points the weights are used as given.
    """
    spec = spec or GridSpec()
    atoms = calc.get_atoms()
    check_slab(atoms)
    eps = _eigenvalues(calc) - calc.get_fermi_level()
    weights = np.asarray(calc.get_k_point_weights())
    nsup = len(edges) - 1
    top = eps[..., -1].min()
    if top < edges[-1]:
        raise ValueError(
            f"calculator's highest band reaches only E_F{top:+.2f} eV; super states need bands up "
            f"to E_F{edges[-1]:+.1f} eV (increase nbands)"
        )
    acc = None
    energy = np.zeros(nsup)
    count = np.zeros(nsup)
    ns, nk, _ = eps.shape
    for s in range(ns):
        for k in range(nk):
            slice_of = np.searchsorted(edges, eps[s, k], side="right") - 1
            bands = np.flatnonzero((slice_of >= 0) & (slice_of < nsup))
            moduli = wavefunction_moduli(calc, bands, [k], half_width=None, spin=s)[0]
            for n, m in zip(bands, moduli):
                g = spec.apply(m.astype(np.float64) ** 2, atoms)
                i = slice_of[n]
                if acc is None:
                    acc = np.zeros((nsup,) + g.shape)
                acc[i] += weights[k] * g
                energy[i] += weights[k] * eps[s, k, n]
                count[i] += weights[k]
    centres = 0.5 * (np.asarray(edges[:-1]) + np.asarray(edges[1:]))
    safe = np.maximum(count, 1e-12)
    moduli = np.sqrt(acc / safe[:, None, None, None])
    energies = np.where(count > 0, energy / safe, centres)
    return moduli.astype(np.float32), energies, count


def density_grid(calc, spec: GridSpec | None = None) -> np.ndarray:
    """Pseudo valence density (both spins) on the window grid, (nz, n1, n2), Å^-3."""
    spec = spec or GridSpec()
    rho = pseudo_density(calc, half_width=None)
    return spec.apply(rho, calc.get_atoms()).astype(np.float32)


def default_bands(nvalence: float, nv: int, nc: int) -> np.ndarray:
    """Band indices of the nv highest valence and nc lowest conduction bands."""
    nocc = int(round(nvalence / 2))
    return np.arange(max(nocc - nv, 0), nocc + nc)


def extract_material(calc, name: str, bands: Sequence[int] | None = None, nv: int = 8,
                     nc: int = 8, spec: GridSpec | None = None,
                     edges: Sequence[float] = SUPER_EDGES, with_context: bool = True
                     ) -> MaterialStates:
    """Everything the model needs from one GPAW calculator (state moduli, energies, super
    states and density when ``with_context``)."""
    spec = spec or GridSpec()
    atoms = calc.get_atoms()
    check_slab(atoms)
    nval = float(calc.get_number_of_electrons())
    if bands is None:
        bands = default_bands(nval, nv, nc)
    bands = np.asarray(bands, dtype=int)
    ms = MaterialStates(
        name=name, atoms=atoms.copy(), kpts=np.asarray(calc.get_ibz_k_points()),
        weights=np.asarray(calc.get_k_point_weights()), eigenvalues=_eigenvalues(calc),
        fermi_level=float(calc.get_fermi_level()), nvalence=nval, bands=bands,
        moduli=state_moduli(calc, bands, spec), meta={"nz": spec.nz, "window": spec.window},
    )
    if with_context:
        ms.density = density_grid(calc, spec)
        ms.super_moduli, ms.super_energies, ms.super_counts = super_states(calc, spec, edges)
    return ms


def ks_states(atoms: Atoms, ecut: float = 300.0, kmesh: int = 6, nbands: int | None = None,
              txt: str | os.PathLike | None = None, gpw: str | os.PathLike | None = None):
    """KS states of the VAE data set: the reference pipeline's PBE plane-wave ground state
    (:func:`ase_mlks.reference.kohnsham.pw_ground_state`, Fermi-Dirac 0.05 eV), then its
    non-self-consistent run on the full (symmetry-free) ``kmesh x kmesh`` Gamma-centred grid
    with ``nbands`` converged bands (default nocc + 20).

    Returns the non-SCF calculator (states on all k-points of the uniform grid). ``gpw``
    stores the SCF ground state (no wave functions) for later band-path runs.
    """
    check_slab(atoms)
    calc = pw_ground_state(atoms, ecut, kmesh, txt=txt)
    if gpw is not None:
        with atomic_path(gpw) as tmp:
            calc.write(tmp)
    nocc = int(round(calc.get_number_of_electrons() / 2))
    nbands = nbands or nocc + 20
    return non_scf(calc, {"size": (kmesh, kmesh, 1), "gamma": True}, nbands=nbands + 4,
                   converge_bands=nbands, txt=txt)


# --------------------------------------------------------------------------- HDF5


def write_material(path: str | os.PathLike, ms: MaterialStates) -> None:
    """Append one material as group ``ms.name`` (rewrites the file atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.exists():
            with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
                for key in src:
                    if key != ms.name:
                        src.copy(src[key], dst, name=key)
        with h5py.File(tmp, "a") as f:
            g = f.create_group(ms.name)
            g.attrs["fermi_level"] = ms.fermi_level
            g.attrs["nvalence"] = ms.nvalence
            for k, v in ms.meta.items():
                g.attrs[k] = v
            write_array(g, "numbers", ms.atoms.numbers)
            write_array(g, "positions", ms.atoms.positions, np.float64)
            write_array(g, "cell", ms.atoms.cell.array, np.float64)
            write_array(g, "pbc", ms.atoms.pbc)
            write_array(g, "kpts", ms.kpts, np.float64)
            write_array(g, "weights", ms.weights, np.float64)
            write_array(g, "eigenvalues", ms.eigenvalues, np.float64)
            write_array(g, "bands", ms.bands)
            write_array(g, "moduli", ms.moduli)
            for name in ("density", "super_moduli", "super_energies", "super_counts"):
                value = getattr(ms, name)
                if value is not None:
                    write_array(g, name, value, np.float64 if value.ndim == 1 else np.float32)


def read_material(path: str | os.PathLike, name: str) -> MaterialStates:
    """Read one material written by :func:`write_material`."""
    with h5py.File(path, "r") as f:
        if name not in f:
            raise KeyError(f"material {name!r} not in {path} (has {sorted(f)})")
        g = f[name]
        atoms = Atoms(numbers=read_array(g, "numbers"), positions=read_array(g, "positions"),
                      cell=read_array(g, "cell"), pbc=read_array(g, "pbc"))
        opt = {k: read_array(g, k) for k in ("density", "super_moduli", "super_energies",
                                             "super_counts") if k in g}
        meta = {k: g.attrs[k] for k in g.attrs if k not in ("fermi_level", "nvalence")}
        return MaterialStates(
            name=name, atoms=atoms, kpts=read_array(g, "kpts"), weights=read_array(g, "weights"),
            eigenvalues=read_array(g, "eigenvalues"), fermi_level=float(g.attrs["fermi_level"]),
            nvalence=float(g.attrs["nvalence"]), bands=read_array(g, "bands"),
            moduli=read_array(g, "moduli"), meta=meta, **opt)


def list_materials(path: str | os.PathLike) -> list[str]:
    with h5py.File(path, "r") as f:
        return sorted(f)


# --------------------------------------------------------------------------- dev data set

HELD_OUT = ("MoS2", "WS2", "CrS2")  # excluded from both trainings, as in the paper


def build_monolayer(name: str, vacuum: float = 5.0) -> Atoms:
    """:func:`ase_mlks.structures.monolayer` by name, made periodic along z too (the KS data
    set's plane-wave runs use a periodic cell with ``vacuum`` Å each side)."""
    atoms = monolayer(name, vacuum=vacuum)
    atoms.pbc = True
    return atoms


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="GPAW KS states of 2D monolayers for the crystal VAE")
    p.add_argument("materials", nargs="+")
    p.add_argument("--out", default="data/raw/gw_ks_dev.h5")
    p.add_argument("--gpw-dir", default="data/raw/gpw")
    p.add_argument("--ecut", type=float, default=300.0)
    p.add_argument("--kmesh", type=int, default=6)
    p.add_argument("--nv", type=int, default=8)
    p.add_argument("--nc", type=int, default=8)
    a = p.parse_args(argv)
    out = Path(a.out)
    done = set(list_materials(out)) if out.exists() else set()
    for name in a.materials:
        if name in done:  # resumable: one group per material
            print(f"{name}: already in {out}", flush=True)
            continue
        t0 = time.time()
        gpw = Path(a.gpw_dir) / f"{name}.gpw"
        gpw.parent.mkdir(parents=True, exist_ok=True)
        calc = ks_states(build_monolayer(name), a.ecut, a.kmesh,
                                 txt=Path(a.gpw_dir) / f"{name}.txt", gpw=gpw)
        t1 = time.time()
        ms = extract_material(calc, name, nv=a.nv, nc=a.nc)
        ms.meta.update(ecut=a.ecut, kmesh=a.kmesh, gpaw_seconds=t1 - t0)
        write_material(out, ms)
        print(f"{name}: GPAW {t1 - t0:.0f} s, extraction {time.time() - t1:.0f} s, "
              f"{ms.moduli.shape}", flush=True)


if __name__ == "__main__":
    main()


def subset(ms: MaterialStates, kpt_indices: Sequence[int], band_positions: Sequence[int]
           ) -> MaterialStates:
    """A smaller copy (chosen k-points and positions in ``ms.bands``), e.g. for test fixtures."""
    k = np.asarray(kpt_indices)
    b = np.asarray(band_positions)
    return MaterialStates(
        name=ms.name, atoms=ms.atoms.copy(), kpts=ms.kpts[k], weights=ms.weights[k],
        eigenvalues=ms.eigenvalues[:, k], fermi_level=ms.fermi_level, nvalence=ms.nvalence,
        bands=ms.bands[b], moduli=ms.moduli[:, k][:, :, b], density=ms.density,
        super_moduli=ms.super_moduli, super_energies=ms.super_energies,
        super_counts=ms.super_counts, meta=dict(ms.meta))
