"""Structure relaxation at the reference level of theory (GPAW LCAO + D3(BJ)), resumable.

The relaxed geometry is the reference for a model's own relaxation (e.g. the out-of-plane
corrugation of a twisted bilayer). One GPAW calculator is kept for the whole run, so every
BFGS step starts its SCF from the previous step's density and wave functions.

Resuming: the BFGS trajectory (``relax.traj``) and Hessian (``bfgs.json``) live in
``workdir``; a killed run restarts from the last written geometry with the same Hessian.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from ..core.errors import AseMlksError
from ..core.graph import layer_net_forces
from .groundstate import check_slab
from .settings import DEFAULT, LCAOSettings, require_gpaw, versions

__all__ = ["RelaxResult", "reference_calculator", "relax_structure", "relaxed_positions_of",
           "store_relaxation", "edit_record", "scan_attribute", "store_interlayer_scan"]


@dataclass
class RelaxResult:
    """Relaxed positions (Å, (N, 3)), energy (eV, GPAW + D3), steps, final max |F| (eV/Å),
    CPU seconds over all (resumed) parts of the run, whether fmax was reached, and the net
    z force on each layer at the end (eV/Å, bottom to top; ``core.graph.layer_net_forces``)."""

    positions: np.ndarray
    energy: float
    steps: int
    fmax: float
    cpu_time: float
    converged: bool
    layer_net_force_z: list[float] | None = None


def reference_calculator(atoms: Atoms, settings: LCAOSettings = DEFAULT,
                         txt: str | None = None):
    """GPAW LCAO with the reference settings, plus D3(BJ) when ``settings.d3`` (eV, eV/Å)."""
    require_gpaw()
    from gpaw import GPAW

    gpaw = GPAW(**settings.gpaw_parameters(atoms), txt=txt)
    if not settings.d3:
        return gpaw
    from ase.calculators.mixing import SumCalculator
    from dftd3.ase import DFTD3

    return SumCalculator([gpaw, DFTD3(method=settings.d3_method, damping=settings.d3_damping)])


def _max_force(forces: np.ndarray) -> float:
    return float(np.linalg.norm(forces, axis=1).max())


def relax_structure(atoms: Atoms, workdir: str | Path, settings: LCAOSettings = DEFAULT,
                    fmax: float = 0.05, steps: int = 200, txt: str | None = None
                    ) -> RelaxResult:
    """BFGS relaxation of all atoms (cell fixed) to max |F| < ``fmax`` eV/Å; resumable."""
    from ase.io import read
    from ase.io.trajectory import Trajectory
    from ase.optimize import BFGS

    check_slab(atoms)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    traj_path, hess_path, state_path = (work / "relax.traj", work / "bfgs.json",
                                        work / "state.json")
    atoms = atoms.copy()
    state = {"cpu_time": 0.0, "steps": 0}
    if traj_path.exists() and traj_path.stat().st_size > 0:
        last = read(str(traj_path), -1)
        if len(last) != len(atoms) or np.any(last.numbers != atoms.numbers):
            raise AseMlksError(f"{traj_path} belongs to another structure; use a new workdir")
        atoms.positions = last.positions
        if state_path.exists():
            state = json.loads(state_path.read_text())
    atoms.calc = reference_calculator(atoms, settings, txt=txt)
    t0 = time.process_time()
    with Trajectory(str(traj_path), "a", atoms) as traj:
        opt = BFGS(atoms, restart=str(hess_path), logfile=str(work / "bfgs.log"))
        opt.attach(traj)

        def save_state() -> None:  # after every step, so a killed run keeps its count
            now = {"cpu_time": state["cpu_time"] + time.process_time() - t0,
                   "steps": state["steps"] + opt.nsteps}
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(now))
            tmp.replace(state_path)

        opt.attach(save_state)
        converged = bool(opt.run(fmax=fmax, steps=steps))
    forces = atoms.get_forces()
    return RelaxResult(positions=atoms.positions.copy(),
                       energy=float(atoms.get_potential_energy()),
                       steps=state["steps"] + opt.nsteps, fmax=_max_force(forces),
                       cpu_time=state["cpu_time"] + time.process_time() - t0,
                       converged=converged, layer_net_force_z=layer_net_forces(atoms, forces))


@contextmanager
def edit_record(path: str | Path, key: str) -> Iterator:
    """Record ``key`` of the HDF5 file ``path`` as an h5py group to modify, atomically: the
    file is copied, the copy edited and moved over the original only if the block succeeds."""
    import h5py

    from ..core.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            if key not in f:
                raise AseMlksError(f"no record {key!r} in {path}")
            yield f[key]


def store_relaxation(path: str | Path, key: str, result: RelaxResult,
                     settings: LCAOSettings, fmax_target: float, command: str = "") -> None:
    """Write ``relaxed_positions`` (+ energy, forces criterion, settings) into record ``key``
    (atomically, :func:`edit_record`)."""
    from ..core.io import write_array

    with edit_record(path, key) as g:
        if len(g["positions"]) != len(result.positions):
            raise AseMlksError(f"record {key!r} has {len(g['positions'])} atoms, the "
                               f"relaxation {len(result.positions)}")
        for name in ("relaxed_positions", "relaxed_energy"):
            if name in g:
                del g[name]
        # positions in float64: the comparison is of 0.01 Å corrugations of a 20 Å cell
        write_array(g, "relaxed_positions", result.positions, dtype=np.float64)
        write_array(g, "relaxed_energy", np.array(result.energy), dtype=np.float64)
        meta = {k: v for k, v in asdict(result).items() if k != "positions"}
        g.attrs["relaxation"] = json.dumps({
            **meta, "fmax_target": fmax_target, "optimizer": "ase BFGS (cell fixed)",
            "settings": settings.todict(), "versions": versions(), "command": command})


def scan_attribute(h: float) -> str:
    """Name of the record attribute that holds an interlayer scan on a grid of spacing h."""
    return f"interlayer_scan_h{h:g}"


def store_interlayer_scan(path: str | Path, key: str, scan: dict) -> None:
    """Keep a rigid interlayer scan of record ``key``'s GPAW relaxation (the summary of
    ``benchmarks/reference_interlayer_scan.py``: grid ``h``, k-grid, per-shift means and
    ``zero_force_mo_mo``) in attribute :func:`scan_attribute` ``(scan["h"])``, atomically."""
    with edit_record(path, key) as g:
        g.attrs[scan_attribute(scan["h"])] = json.dumps({**scan, "versions": versions()})


def relaxed_positions_of(path: str | Path, key: str, atoms: Atoms) -> np.ndarray:
    """GPAW-relaxed positions (Å, (N, 3)) that :func:`store_relaxation` wrote into record
    ``key`` of ``path``, checked to belong to ``atoms`` (same atoms, same cell)."""
    from ..core.dataset import StructureDataset

    with StructureDataset(path, "r") as ds:
        if key not in ds:
            raise AseMlksError(f"no record {key!r} in {path}")
        other = ds.read(key)
    if "relaxed_positions" not in other:
        raise AseMlksError(f"{path}: {key} holds no GPAW relaxation to start from")
    same = (len(other["numbers"]) == len(atoms)
            and np.array_equal(other["numbers"], atoms.numbers)
            and np.allclose(other["cell"], atoms.cell[:], atol=1e-6))
    if not same:
        raise AseMlksError(f"{path}: {key} is another structure (atoms or cell differ)")
    return np.asarray(other["relaxed_positions"], float)
