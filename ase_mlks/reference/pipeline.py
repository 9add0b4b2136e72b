"""Resumable reference-data runner: structures in, one HDF5 group per structure out.

* ``compute_slab_record`` runs one LCAO(+D3) ground state and its post-processing
  (Wannier H(R) with a band-error check, optional AO H(R)/S(R)) and returns plain arrays.
* ``run_dataset`` feeds (key, atoms) items through a process pool (or serially), skips keys
  that are already complete in the output file (resume), and writes every finished record
  atomically: the file is copied, the record appended, and the copy moved into place, so a
  crash never leaves a half-written file.
* Under MPI (``gpaw -P N python -m ase_mlks.reference ...``) every structure is computed by
  all ranks together and only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

from ..core.dataset import StructureDataset
from ..core.errors import AseMlksError, StructureError
from ..core.io import atomic_path
from .settings import DEFAULT, LCAOSettings, versions

log = logging.getLogger("ase_mlks.reference")

__all__ = ["RecordOptions", "ReferenceFailure", "check_path", "compute_slab_record",
           "run_dataset", "write_record", "bilayer_items", "monolayer_items",
           "existing_keys", "wrap_like_gpaw"]


class ReferenceFailure(AseMlksError):
    """Some structures of a run failed; the others were stored. ``failed``: key -> error."""

    def __init__(self, failed: dict[str, str], stored: list[str]):
        self.failed, self.stored = failed, stored
        lines = "\n".join(f"  {k}: {v}" for k, v in failed.items())
        super().__init__(f"{len(failed)} structure(s) failed ({len(stored)} stored):\n{lines}")


@dataclass(frozen=True)
class RecordOptions:
    """What to compute for each slab besides the ground state.

    wannier_basis: projection orbitals ({} to skip Wannier); wannier_kpts: grid of the
    non-self-consistent calculation the Wannier H(R) is Fourier-transformed from (None: the
    SCF grid); h_threshold: drop |H_ab(R)| below this (eV) when storing; band_path: special
    points of the band-error check ('' to skip); band_npoints: points on that path;
    gpaw_bands: store GPAW's bands on the path for the ``gpaw_nbands`` bands nearest the gap;
    ao: also store the AO H(R), S(R) of GPAW's LCAO basis; localization_steps: fixed
    number of spread-minimizing steps after the Löwdin projection (0: none; the non-SCF
    run then keeps every k-point, no time-reversal reduction).
    """

    wannier_basis: dict = field(default_factory=lambda: {"Mo": "4d", "S": "3p"})
    wannier_kpts: tuple[int, int] | None = (6, 6)
    # 'weight' (isolated manifold) or {'frozen': (lo, hi), 'outer': (lo, hi)} in eV
    # relative to the Fermi level (disentanglement for entangled bands)
    wannier_selection: object = "weight"
    h_threshold: float = 1e-4
    band_path: str = "GMKG"
    band_npoints: int = 31
    gpaw_bands: bool = False
    gpaw_nbands: int = 8
    ao: bool = False
    localization_steps: int = 0

    def todict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def fromdict(cls, d: dict) -> RecordOptions:
        """Inverse of :meth:`todict`, also for its JSON form (a record's ``options``)."""
        grid = d.get("wannier_kpts")
        return cls(**{**d, "wannier_kpts": None if grid is None else tuple(grid)})


def _mpi_rank() -> int:
    try:
        from gpaw.mpi import world

        return world.rank
    except ImportError:
        return 0


def check_path(atoms: Atoms, path: str, npoints: int):
    """The ``path`` (e.g. 'GMKG') band path of ``atoms``' cell, as an ASE ``BandPath``.

    A strained hexagonal cell is no longer hexagonal, so ASE finds no K point in it; its
    special points are then taken, in fractional coordinates, from the nearest hexagonal
    cell (same vector order, mean in-plane length, 60° or 120°) — the points a strained
    layer's bands are labelled by.
    """
    from ase.cell import Cell

    try:
        return atoms.cell.bandpath(path, npoints=npoints)
    except KeyError:
        a1, a2, a3 = atoms.cell.cellpar()[:3]
        gamma = atoms.cell.cellpar()[5]
        hexcell = Cell.fromcellpar([(a1 + a2) / 2, (a1 + a2) / 2, a3, 90, 90,
                                    60.0 if gamma < 90 else 120.0])
        special = hexcell.bandpath(npoints=0, pbc=atoms.pbc).special_points
        missing = [p for p in path if p not in special]
        if missing:
            raise StructureError(f"band path {path!r}: no special point(s) {missing} for a "
                                 f"cell of lattice type {atoms.cell.get_bravais_lattice()}"
                                 ) from None
        return atoms.cell.bandpath(path, npoints=npoints, special_points=special,
                                   pbc=atoms.pbc)


def wrap_like_gpaw(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` with every periodic fractional coordinate taken modulo 1.

    GPAW places its atoms (hence its LCAO orbitals and the Wannier projections) at
    ``atoms.get_scaled_positions()``, i.e. exactly these positions. The lattice vectors R of
    a stored H(R) refer to them, so a record must store them too: an atom left outside the
    cell would pair its hoppings with the wrong images. (``Atoms.wrap`` is not the same: it
    leaves coordinates within 1e-7 below zero unwrapped, which GPAW moves to ~1.)
    """
    out = atoms.copy()
    out.set_scaled_positions(atoms.get_scaled_positions(wrap=True))
    return out


def _check_wrapped(atoms: Atoms) -> None:
    """Refuse positions GPAW would move (see :func:`wrap_like_gpaw`)."""
    moved = np.linalg.norm(wrap_like_gpaw(atoms).positions - atoms.positions, axis=1)
    if np.any(moved > 1e-8):
        idx = np.flatnonzero(moved > 1e-8).tolist()
        raise StructureError(
            f"atoms {idx} lie outside the cell: GPAW would move them by a lattice vector and "
            "the stored H(R) would not match the stored positions; pass "
            "ase_mlks.reference.pipeline.wrap_like_gpaw(atoms)")


def compute_slab_record(atoms: Atoms, settings: LCAOSettings = DEFAULT,
                        options: RecordOptions = RecordOptions(), txt: str | None = None
                        ) -> dict:
    """Ground state + post-processing of one slab; returns arrays, a TB and metadata."""
    from .groundstate import run_groundstate

    if options.wannier_basis or options.ao:
        _check_wrapped(atoms)  # before the SCF: a mismatched H(R) would be stored silently
    t0 = time.process_time()
    w0 = time.time()
    # before the SCF: a path that cannot be built must not cost a ground state first
    needs_path = options.band_path and (options.wannier_basis or options.gpaw_bands)
    path = check_path(atoms, options.band_path, options.band_npoints) if needs_path else None
    gs = run_groundstate(atoms, settings, txt=txt)
    rec: dict = {
        "arrays": {
            "energy": np.array(gs.energy),
            "forces": gs.forces,
            "energy_dft": np.array(gs.energy_dft),
            "forces_dft": gs.forces_dft,
            "energy_d3": np.array(gs.energy_d3),
            "forces_d3": gs.forces_d3,
            "eigenvalues": gs.eigenvalues,
            "ibz_kpts": gs.ibz_kpts,
            "kweights": gs.kweights,
            "fermi_level": np.array(gs.fermi_level),
            "vacuum_level": np.array(gs.vacuum_level),
            "tags": np.asarray(atoms.get_tags(), np.int32),
        },
        "meta": {"cpu_time_groundstate": gs.cpu_time},
        "groups": {},
    }
    if gs.stress is not None:
        rec["arrays"]["stress"] = gs.stress
    calc = gs.calc
    wcalc = calc
    path_eigs = None
    if options.wannier_basis or options.ao:
        # non-SCF run with all nao bands: the SCF keeps too few empty bands to hold the
        # whole d/p manifold of a bilayer (its upper d bands lie above them)
        wgrid = tuple(options.wannier_kpts or settings.kpts)
        # the localization integrals need every k-point's wave functions
        symmetry = ("off" if options.localization_steps > 0
                    else {"point_group": False, "time_reversal": True})
        wcalc = calc.fixed_density(
            kpts={"size": (*wgrid, 1), "gamma": True}, nbands="nao", symmetry=symmetry,
            txt=None)
        wcalc.get_potential_energy()
    full = None
    if options.wannier_basis:
        from .wannier import build_wannier, compare_bands, gpaw_manifold_bands

        selection, window = options.wannier_selection, None
        if isinstance(selection, dict):
            ef = gs.fermi_level
            selection = {k: (ef + v[0], ef + v[1]) for k, v in selection.items()}
            window = selection["frozen"]
        try:
            full = build_wannier(wcalc, atoms, basis=options.wannier_basis,
                                 width=settings.width, selection=selection,
                                 localization_steps=options.localization_steps)
        except ValueError as err:  # windows that do not fit this structure: keep E, F
            log.warning("Wannier construction failed: %s", err)
            rec["meta"]["wannier_error"] = str(err)
            full = None
    if options.wannier_basis and full is not None:
        res = _truncate(full, options.h_threshold) if options.h_threshold > 0 else full
        tb = res.tb()
        meta = {"grid": list(res.grid), "min_singular": res.min_singular,
                "selection": res.selection, "h_threshold": options.h_threshold,
                "nnz_before_threshold": int(full.tb().nnz), "basis": options.wannier_basis,
                "selection_relative_to_fermi": options.wannier_selection}
        if res.localization is not None:
            meta["localization"] = res.localization
        if path is not None:
            ref, path_eigs = gpaw_manifold_bands(calc, path.kpts, basis=options.wannier_basis,
                                                 return_all=True)
            nval = calc.get_number_of_electrons()
            be = compare_bands(res, path.kpts, ref, path_eigs, nval, window)
            be_full = compare_bands(full, path.kpts, ref, path_eigs, nval, window)
            meta.update(band_error_max=be["max_error"], band_error_rms=be["rms_error"],
                        band_error_vbm=be.get("vbm_error"), band_error_cbm=be.get("cbm_error"),
                        band_error_max_untruncated=be_full["max_error"],
                        band_error_vbm_untruncated=be_full.get("vbm_error"),
                        band_error_cbm_untruncated=be_full.get("cbm_error"),
                        band_path=options.band_path)
            rec["arrays"]["path_kpts"] = path.kpts
            rec["arrays"]["wannier_gpaw_bands"] = ref
        rec["groups"]["wannier"] = (tb, meta)
    if options.gpaw_bands and path is not None:
        from .kohnsham import bands_near_gap, gpaw_bands_near_gap

        rec["arrays"]["path_kpts"] = path.kpts
        if path_eigs is not None:  # already computed for the Wannier check
            rec["arrays"]["gpaw_bands"] = bands_near_gap(
                path_eigs, calc.get_number_of_electrons(), options.gpaw_nbands)
        else:
            rec["arrays"]["gpaw_bands"] = gpaw_bands_near_gap(calc, path.kpts,
                                                              options.gpaw_nbands)
    if options.ao:
        from .lcao import ao_hamiltonian

        # from the dense non-SCF grid: exact once the BvK cell exceeds twice the AO range
        rec["groups"]["ao"] = (ao_hamiltonian(wcalc, atoms, threshold=1e-4),
                               {"grid": list(options.wannier_kpts or settings.kpts)})
    rec["meta"]["cpu_time"] = time.process_time() - t0
    rec["meta"]["wall_time"] = time.time() - w0
    rec["calc"] = calc  # not stored; lets callers reuse the converged calculator
    return rec


def _truncate(res, threshold: float):
    """Zero H(R) elements below ``threshold`` eV (on-site blocks are always kept)."""
    from dataclasses import replace

    H = res.H.copy()
    small = np.abs(H) < threshold
    H[small] = 0.0
    keep = np.abs(H).reshape(len(H), -1).max(axis=1) > 0
    return replace(res, R=res.R[keep], H=H[keep])


def existing_keys(path: str | os.PathLike) -> set[str]:
    """Keys already complete in an output file (empty if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return set()
    with StructureDataset(path, "r") as ds:
        return set(ds.keys())


def write_record(path: str | os.PathLike, key: str, atoms: Atoms, record: dict,
                 metadata: dict) -> None:
    """Append one record to ``path`` atomically (copy, append, replace)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.exists():
            shutil.copyfile(path, tmp)
        else:
            tmp.unlink()

        def writer(group):
            for name, (obj, meta) in record.get("groups", {}).items():
                sub = group.create_group(name)
                obj.to_hdf5(sub)
                for k, v in meta.items():
                    sub.attrs[k] = v if isinstance(v, int | float | str) else json.dumps(v)

        with StructureDataset(tmp, "a") as ds:
            ds.append(key, atoms, metadata={**metadata, **record.get("meta", {})},
                      writer=writer, **record["arrays"])


def _worker(args):
    func, key, atoms, settings, options, txtdir = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    txt = None if txtdir is None else str(Path(txtdir) / f"{key}.txt")
    rec = func(atoms, settings, options, txt=txt)
    rec.pop("calc", None)  # GPAW calculators do not cross process boundaries
    return key, rec


def run_dataset(path: str | os.PathLike, items: Iterable[tuple[str, Atoms]],
                settings: LCAOSettings = DEFAULT, options: RecordOptions = RecordOptions(),
                workers: int = 1, command: str = "", txtdir: str | None = None,
                compute: Callable | None = None, progress: bool = True) -> list[str]:
    """Compute and store every (key, atoms) not yet in ``path``; returns the new keys.

    workers > 1 runs structures in a process pool (GPAW serial per structure); the parent
    process is the only writer. ``command`` (the exact command line) and the settings,
    options and code versions are stored with every record.
    """
    from tqdm import tqdm

    done = existing_keys(path)
    # computed and stored where GPAW puts the atoms, so H(R) and positions agree
    todo = [(k, wrap_like_gpaw(a)) for k, a in items if k not in done]
    if txtdir is not None:
        Path(txtdir).mkdir(parents=True, exist_ok=True)
    rank = _mpi_rank()
    meta_common = {"settings": settings.todict(), "options": options.todict(),
                   "versions": versions(), "command": command}
    new: list[str] = []
    failed: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc=f"reference {Path(path).name}", disable=not progress
               or rank != 0)

    def store(key, atoms, rec):
        info = {k: v for k, v in atoms.info.items() if isinstance(v, int | float | str | tuple)}
        if rank == 0:
            write_record(path, key, atoms, rec, {**meta_common, "info": info})
        new.append(key)
        bar.update()
        log.info("%s done: E=%.4f eV, cpu %.0f s", key, float(rec["arrays"]["energy"]),
                 rec["meta"]["cpu_time"])

    def fail(key, err):
        failed[key] = f"{type(err).__name__}: {err}"
        log.error("%s failed: %s", key, failed[key])

    func = compute or compute_slab_record
    # One failed structure must not take the others down with it: it is reported, the rest
    # are computed and stored, and ReferenceFailure lists the failures at the end. (A pool
    # whose result raised would otherwise finish every queued structure and discard them.)
    if workers <= 1:
        for key, atoms in todo:
            try:
                key, rec = _worker((func, key, atoms, settings, options, txtdir))
            except Exception as err:  # noqa: BLE001 - reported, others carry on
                fail(key, err)
                continue
            store(key, atoms, rec)
    else:
        atoms_of = dict(todo)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futs = {pool.submit(_worker, (func, k, a, settings, options, txtdir)): k
                    for k, a in todo}
            for fut in as_completed(futs):
                try:
                    key, rec = fut.result()
                except Exception as err:  # noqa: BLE001 - reported, others carry on
                    fail(futs[fut], err)
                    continue
                store(key, atoms_of[key], rec)
    bar.close()
    if failed:
        raise ReferenceFailure(failed, new)
    return new


def bilayer_items(start: int, count: int, seed: int = 0, prefix: str = "bl",
                  **kwargs) -> Iterator[tuple[str, Atoms]]:
    """(key, atoms) of DPWannier-style bilayer configurations ``start .. start+count-1``.

    Configuration i is drawn from its own generator seeded by (seed, i), so any index
    range can be regenerated independently (resume, split across machines).
    """
    from ..structures import bilayer_configuration

    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        atoms = bilayer_configuration(rng, **kwargs)
        atoms.info["index"] = i
        atoms.info["seed"] = seed
        yield f"{prefix}{i:05d}", atoms


def monolayer_items(material: str, start: int, count: int, seed: int = 0,
                    **kwargs) -> Iterator[tuple[str, Atoms]]:
    """(key, atoms) of distorted monolayers ``start .. start+count-1`` (key
    'monolayer_<material>_<index>'), each from its own generator seeded by (seed, i)."""
    from ..structures import monolayer_configuration

    for i in range(start, start + count):
        atoms = monolayer_configuration(np.random.default_rng([seed, i]), material, **kwargs)
        atoms.info["index"] = i
        atoms.info["seed"] = seed
        yield f"monolayer_{material}_{i:05d}", atoms
