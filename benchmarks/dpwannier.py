"""DPWannierCalc benchmark: accuracy vs GPAW and speed, measured side by side in one run.

    python benchmarks/dpwannier.py [--model mos2-bilayer] [--data data/mos2_bilayer.h5]
        [--twisted tests/data/<fixture>.h5 ...] [--gpaw 42] [--large 201 1308]
        [--relax-large] [--out benchmarks/out]

Sections (each skipped when its inputs are missing, and said so in the JSON):

1. held-out bilayers (the checkpoint's own 20% split of the GPAW data): energy MAE
   (meV/atom), force MAE (meV/Å), H-element MAE (meV, |H| > 1 meV) + parity plots.
2. unseen twisted bilayers (GPAW fixtures with bands on Γ-M-K-Γ): MAE of the 4 highest
   valence and 4 lowest conduction bands (meV, absolute energies vs vacuum), gap error;
   model relaxation of the cell (max out-of-plane displacement, and vs a GPAW-relaxed
   structure where the fixture holds one); unrelaxed forces and energy vs the fixture's
   Γ-only SCF and vs the same cell on a 2x2 k-grid (``--twisted-kconv``).
3. speed side by side: DPWannierCalc energy+forces and band structure on the 42/114-atom
   cells, and one real GPAW LCAO energy+forces (pinned reference settings, nice'd) on the
   cells listed by ``--gpaw``; ratio = GPAW time / model time.
4. large cells (paper's 201 and 1,308 atoms, near-commensurate 8.95° and 3.42°): seconds
   per force call, seconds for a 100-k-point band structure of the 20 bands nearest the
   gap, peak memory (each in its own process), and with ``--relax-large`` the full
   relaxation (BFGS, fmax 0.01 eV/Å) + band structure of each of them.

Prints a table, writes ``dpwannier.json`` and PNGs into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase.dft.kpoints import BandPath

TWIST = {42: (1, 2), 114: (2, 3), 222: (3, 4)}
# the paper's near-commensurate cells (docs/reference.md): layer-1 and layer-2 vectors
RELAX_STEPS = 500
# E/F of the twisted fixtures' cells with a 2x2 k-grid (theirs are Γ-only; docs/reference.md)
KCONV_FIXTURE = "tests/data/mos2_twisted_kconv.h5"
LARGE = {201: ((5, 1), (6, 0)), 1308: ((14, 1), (15, 0))}


def _timed(fn, *args, repeat: int = 1, cpu: bool = False, **kwargs):
    """(result, best wall seconds of ``repeat`` runs) — or (result, wall, cpu) if ``cpu``.

    CPU seconds (process time) are reported beside wall seconds because the benchmark
    machine is shared: wall time then measures the neighbours as much as the code.
    """
    best, best_cpu, out = np.inf, np.inf, None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return (out, best, best_cpu) if cpu else (out, best)


def _calc(model: str):
    from ase_mlks.dpwannier import DPWannierCalc

    return DPWannierCalc(model=model)


def _parity(ref, pred, label: str, unit: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(ref, pred, s=2, alpha=0.4)
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    mae = float(np.mean(np.abs(ref - pred)))
    ax.set_xlabel(f"GPAW {label} ({unit})")
    ax.set_ylabel(f"DPWannier {label} ({unit})")
    ax.set_title(f"{label}: MAE {mae:.3g} {unit}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- 1. held-out bilayers ------------------------------------------------------------------
def _extra(model) -> dict:
    """The training record saved with a checkpoint (split, alignment, held-out scores)."""
    return model.checkpoint_meta.get("extra", {}) if hasattr(model, "checkpoint_meta") else {}


def _group(key: str) -> str:
    """'strained' for the strained-cell records (bs*), 'twisted' for the displaced twisted
    cells (tw*), 'unstrained' for the rest."""
    name = key.split(":")[-1]
    return {"bs": "strained", "tw": "twisted"}.get(name[:2], "unstrained")


def heldout(calc, data: Path, out: Path, unseen: list[Path] | None = None,
            keys_from: str | None = None) -> dict:
    """Energy/force/H errors on held-out structures of ``data``.

    The held-out keys are the checkpoint's own, or those of the checkpoint ``keys_from``
    (to score an older model on a newer model's held-out split, side by side).
    """
    import torch

    from ase_mlks.dpwannier.data import DPWannierData
    from ase_mlks.dpwannier.trainer import (
        H_THRESHOLD,
        element_masks,
        hop_geometry,
        hopping_shell_table,
    )

    model = calc.model
    extra = _extra(model)
    keys = extra.get("val_keys")
    source = "checkpoint's held-out split"
    if keys_from is not None:
        keys = _extra(_calc(keys_from).model).get("val_keys")
        source = f"held-out split of {keys_from}"
    if not keys or not data.exists():
        # structures the model never saw: every complete record of the --unseen files
        from torch.utils.data import ConcatDataset

        from ase_mlks.core.dataset import StructureDataset

        parts = []
        for p in unseen or []:
            if p.exists():
                with StructureDataset(p, "r") as sd:
                    k = sd.keys()
                if k:
                    parts.append(DPWannierData(p, k, model))
        if not parts:
            return {"skipped": "no held-out keys in the checkpoint and no --unseen data"}
        ds = ConcatDataset(parts)
        source = "unseen files: " + ", ".join(str(p) for p in unseen or [])
        names = None
    else:
        ds = DPWannierData(data, keys, model)
        names = keys
    e_ref, e_pred, f_ref, f_pred, h_ref, h_pred, nat = [], [], [], [], [], [], []
    hop_ref, hop_pred, hop_r, hop_inter = [], [], [], []
    groups: dict[str, dict[str, list]] = {}
    for n in range(len(ds)):
        s = ds[n]
        g = s.graph.to(torch.float64)
        o = model(g, forces=True, hamiltonian=s.onsite is not None)
        nat.append(len(s.forces))
        e_ref.append(float(s.energy[0]))
        e_pred.append(float(o["energy"][0].detach()))
        f_ref.append(s.forces.numpy().ravel())
        f_pred.append(o["forces"].detach().numpy().ravel())
        if names is not None:
            grp = groups.setdefault(_group(names[n]), {"e": [], "f": [], "dh": []})
            grp["e"].append(abs(e_ref[-1] - e_pred[-1]) / nat[-1])
            grp["f"].append(np.abs(f_ref[-1] - f_pred[-1]))
        if s.onsite is not None:
            on_m, hop_m = element_masks(model, s)
            h_ref += [s.onsite[on_m].numpy(), s.hop[hop_m].numpy()]
            h_pred += [o["onsite"].detach()[on_m].numpy(), o["hop"].detach()[hop_m].numpy()]
            if names is not None:
                r_, p_ = np.concatenate(h_ref[-2:]), np.concatenate(h_pred[-2:])
                big_ = np.abs(r_) > H_THRESHOLD
                grp["dh"].append(np.abs(r_ - p_)[big_])
            r, inter = hop_geometry(model, g)
            shape = s.hop.shape
            hop_ref.append(s.hop[hop_m].numpy())
            hop_pred.append(o["hop"].detach()[hop_m].numpy())
            hop_r.append(r[:, None, None].expand(shape)[hop_m].numpy())
            hop_inter.append(inter[:, None, None].expand(shape)[hop_m].numpy())
    nat = np.array(nat, float)
    e_ref, e_pred = np.array(e_ref) / nat, np.array(e_pred) / nat
    f_ref, f_pred = np.concatenate(f_ref), np.concatenate(f_pred)
    res = {"source": source, "n_structures": len(ds), "n_train": extra.get("n_train"),
           "energy_mae_meV_atom": 1e3 * float(np.mean(np.abs(e_ref - e_pred))),
           "force_mae_meV_A": 1e3 * float(np.mean(np.abs(f_ref - f_pred))),
           "force_rms_ref_meV_A": 1e3 * float(np.sqrt(np.mean(f_ref**2)))}
    for name, grp in groups.items():
        res[f"{name}_n"] = len(grp["e"])
        res[f"{name}_energy_mae_meV_atom"] = 1e3 * float(np.mean(grp["e"]))
        res[f"{name}_force_mae_meV_A"] = 1e3 * float(np.mean(np.concatenate(grp["f"])))
        if grp["dh"]:
            res[f"{name}_n_hamiltonian"] = len(grp["dh"])
            res[f"{name}_h_mae_meV"] = 1e3 * float(np.mean(np.concatenate(grp["dh"])))
    _parity(f_ref, f_pred, "force components", "eV/Å", out / "dpwannier_parity_forces.png")
    _parity(e_ref, e_pred, "energy per atom", "eV", out / "dpwannier_parity_energy.png")
    if h_ref:
        hr, hp = np.concatenate(h_ref), np.concatenate(h_pred)
        big = np.abs(hr) > H_THRESHOLD
        res["h_mae_meV"] = 1e3 * float(np.mean(np.abs(hr[big] - hp[big])))
        res["h_elements"] = int(big.sum())
        _parity(hr[big], hp[big], "H elements", "eV", out / "dpwannier_parity_h.png")
        res["h_shells"] = hopping_shell_table(*(np.concatenate(x) for x in
                                                (hop_ref, hop_pred, hop_r, hop_inter)))
    return res


# -- 2. unseen twisted bilayers -----------------------------------------------------------------
def _fixture_records(paths: list[Path]) -> list[dict]:
    from ase_mlks.core.dataset import StructureDataset

    recs = []
    for p in paths:
        if not p.exists():
            continue
        with StructureDataset(p, "r") as ds:
            for k in ds.keys():
                if k.startswith("twisted_MoS2"):
                    r = ds.read(k)
                    r["key"], r["file"] = k, str(p)
                    recs.append(r)
    return recs


def _edge_bands(eps: np.ndarray, nocc: int, nv: int = 4, nc: int = 4) -> np.ndarray:
    return eps[:, nocc - nv:nocc + nc]


def _kpts_of(rec: dict) -> list[int] | None:
    """The SCF k-grid a reference record was computed with (from its stored settings)."""
    settings = rec.get("attrs", {}).get("settings")
    return json.loads(settings).get("kpts") if settings else None


def _force_errors(forces: np.ndarray, energy: float, rec: dict, tag: str) -> dict:
    """Force MAE (all, z, in-plane; meV/Å) and energy error (meV/atom) against ``rec``."""
    d = forces - rec["forces"]
    return {f"force_mae_meV_A_{tag}": 1e3 * float(np.mean(np.abs(d))),
            f"force_mae_z_meV_A_{tag}": 1e3 * float(np.mean(np.abs(d[:, 2]))),
            f"force_mae_xy_meV_A_{tag}": 1e3 * float(np.mean(np.abs(d[:, :2]))),
            f"energy_error_meV_atom_{tag}": 1e3 * (energy - float(rec["energy"])) / len(d),
            f"reference_kpts_{tag}": _kpts_of(rec)}


def _kconverged_errors(forces: np.ndarray, energy: float, rec: dict,
                       kconv: dict[str, dict]) -> dict:
    """The same cell against a denser-k reference, and that reference against the fixture's.

    The twisted fixtures' SCFs are Γ-only (like their GPAW relaxations); the training cells
    use a 3x3 grid on 2x2 cells. How far the Γ-only forces themselves are from k-converged
    ones bounds what the fixture's force MAE can show.
    """
    ref = kconv.get(rec["key"])
    if ref is None:
        return {}
    if not np.allclose(ref["positions"], rec["positions"], atol=1e-6):
        raise ValueError(f"{ref['file']}: {rec['key']} is not the fixture's structure")
    out = _force_errors(forces, energy, ref, "kconv")
    gamma_vs_k = _force_errors(rec["forces"], float(rec["energy"]), ref, "fixture_vs_kconv")
    out.update({k: v for k, v in gamma_vs_k.items() if not k.startswith("reference_kpts")})
    return out


def twisted(calc, paths: list[Path], out: Path,
            kconv_paths: list[Path] | None = None) -> list[dict]:
    from ase.optimize import BFGS

    from ase_mlks.core.errors import StructureError

    kconv = {r["key"]: r for r in _fixture_records(kconv_paths or [])}
    results = []
    for rec in _fixture_records(paths):
        atoms = rec["atoms"]
        row = {"key": rec["key"], "natoms": len(atoms), "file": rec["file"]}
        ref = rec.get("gpaw_bands")
        kpts = rec.get("path_kpts")
        calc.reset()
        atoms.calc = calc
        ham = calc.get_hamiltonian(atoms)
        nocc = int(round(ham.nelectrons / 2))
        if ref is not None and kpts is not None:
            eps = ham.eigenvalues(kpts)
            nv = ref.shape[1] // 2
            mine = _edge_bands(eps, nocc, nv, ref.shape[1] - nv)
            gap_ref = float(ref[:, nv:].min() - ref[:, :nv].max())
            gap = float(mine[:, nv:].min() - mine[:, :nv].max())
            row.update(band_mae_meV=1e3 * float(np.mean(np.abs(mine - ref))),
                       band_mae_aligned_vbm_meV=1e3 * float(np.mean(np.abs(
                           (mine - mine[:, :nv].max()) - (ref - ref[:, :nv].max())))),
                       gap_gpaw_eV=gap_ref, gap_model_eV=gap, gap_error_meV=1e3 * (gap - gap_ref),
                       vbm_error_meV=1e3 * float(mine[:, :nv].max() - ref[:, :nv].max()),
                       bands_compared=f"{nv} valence + {ref.shape[1] - nv} conduction, "
                                      f"{len(kpts)} k on Γ-M-K-Γ")
            _plot_bands(kpts, ref, mine, atoms, out / f"dpwannier_bands_{rec['key']}.png")
        row.update(_twisted_h_errors(calc, rec))
        if "forces" in rec:
            f, e = calc.get_forces(atoms), calc.get_potential_energy(atoms)
            row.update(_force_errors(f, e, rec, "fixture"))
            # the same number under the name of the JSON in benchmarks/out from earlier sessions
            row["force_mae_meV_A_unrelaxed"] = row["force_mae_meV_A_fixture"]
            row.update(_kconverged_errors(f, e, rec, kconv))
        relaxed = atoms.copy()
        relaxed.calc = calc
        z0 = atoms.positions[:, 2].copy()
        t0 = time.perf_counter()
        opt = BFGS(relaxed, logfile=None)
        try:
            opt.run(fmax=0.01, steps=RELAX_STEPS)
        except StructureError as err:  # the model drove atoms outside its training range
            row["relax_error"] = f"after {opt.nsteps} BFGS steps: {err}"
        row.update(relax_steps=opt.nsteps, relax_s=time.perf_counter() - t0,
                   relax_max_dz_A=float(np.abs(relaxed.positions[:, 2] - z0).max()))
        if "relaxed_positions" in rec:
            row.update(_compare_relaxations(atoms, relaxed, rec))
        else:
            row["relaxed_vs_gpaw"] = "no GPAW-relaxed structure in the fixture"
        dense = kconv.get(rec["key"], {})
        if "relaxed_positions" in dense:  # the same relaxation on the denser k-grid
            row.update({f"{k}_kconv": v for k, v in
                        _compare_relaxations(atoms, relaxed, dense).items()})
        results.append(row)
    return results


def _s_layer_thickness(atoms) -> float:
    """Mean vertical S–S distance within a layer (Å): where Γ-only forces err (z of S)."""
    from ase_mlks.core.graph import assign_layers

    layer = assign_layers(atoms)
    z = atoms.positions[:, 2]
    out = []
    for n in np.unique(layer):
        zs = np.sort(z[(layer == n) & (atoms.numbers == 16)])
        half = len(zs) // 2
        out.append(zs[half:].mean() - zs[:half].mean())
    return float(np.mean(out))


def _compare_relaxations(start, model_relaxed, rec: dict) -> dict:
    """Model relaxation vs the GPAW one from the same start: interlayer distance, the
    atomic displacements (rigid translation removed) and the relaxation energies."""
    from ase_mlks.core.graph import interlayer_distance
    from ase_mlks.reference.relax import scan_attribute

    gpaw = start.copy()
    gpaw.positions = rec["relaxed_positions"]
    d = model_relaxed.positions - gpaw.positions
    d -= d.mean(axis=0)
    out = {"relaxed_vs_gpaw_max_dz_A": float(np.abs(d[:, 2]).max()),
           "relaxed_vs_gpaw_rmsd_A": float(np.sqrt((d ** 2).sum(axis=1).mean())),
           "interlayer_MoMo_start_A": interlayer_distance(start),
           "interlayer_MoMo_gpaw_A": interlayer_distance(gpaw),
           "interlayer_MoMo_model_A": interlayer_distance(model_relaxed),
           "S_thickness_gpaw_A": _s_layer_thickness(gpaw),
           "S_thickness_model_A": _s_layer_thickness(model_relaxed)}
    scan = rec.get("attrs", {}).get(scan_attribute(0.15))
    if scan is not None:  # zero of GPAW's net interlayer force on the finer grid
        out["interlayer_MoMo_gpaw_zero_force_h0.15_A"] = json.loads(scan)["zero_force_mo_mo"]
    if "relaxed_energy" in rec and "energy" in rec:
        out["relax_energy_gpaw_meV"] = 1e3 * float(rec["relaxed_energy"] - rec["energy"])
        out["relax_energy_model_meV"] = 1e3 * float(model_relaxed.get_potential_energy()
                                                    - start.get_potential_energy())
    return out


def _twisted_h_errors(calc, rec: dict) -> dict:
    """H-element MAE (|H| > 1 meV) vs the fixture's Wannier H(R), on pairs closer than
    the Wigner-Seitz radius of its k-grid (beyond it the reference folds images)."""
    import h5py

    from ase_mlks.core.hamiltonian import TBHamiltonian
    from ase_mlks.dpwannier.trainer import wannier_h_errors

    with h5py.File(rec["file"], "r") as f:
        grp = f[rec["key"]].get("wannier")
        if grp is None:
            return {}
        ham = TBHamiltonian.from_hdf5(grp)
        grid = json.loads(grp.attrs["grid"])
    return wannier_h_errors(calc.model, calc.graph(rec["atoms"]), ham, grid)


def _plot_bands(kpts, ref, mine, atoms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase.dft.kpoints import BandPath

    from ase_mlks.reference.pipeline import check_path

    # The fixture's path is a plain k-point list; a BandPath with the special points the
    # pipeline built it from finds where they lie on it, for the tick labels.
    special = check_path(atoms, "GMKG", npoints=2).special_points
    x, xs, labels = BandPath(atoms.cell, kpts=np.asarray(kpts, dtype=float),
                             special_points=special).get_linear_kpoint_axis()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(x, ref, "k-", lw=1)
    ax.plot(x, mine, "r--", lw=1)
    ax.plot([], [], "k-", label="GPAW LCAO")
    ax.plot([], [], "r--", label="DPWannier")
    ax.set_ylabel("energy vs vacuum (eV)")
    ax.set_xticks(xs, [r"$\Gamma$" if k == "G" else k for k in labels])
    for v in xs[1:-1]:
        ax.axvline(v, color="0.8", lw=0.5)
    ax.set_xlim(x[0], x[-1])
    ax.set_title(f"{path.stem.removeprefix('dpwannier_bands_')} ({len(atoms)} atoms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- 3. speed side by side ------------------------------------------------------------------
def _gpaw_settings(atoms):
    from ase_mlks.reference.settings import DEFAULT

    # the twisted-fixture command's default: Γ-only SCF for twisted cells (see reference CLI)
    return DEFAULT.with_kpts((1, 1))


def speed(calc, gpaw_cells: list[int]) -> list[dict]:
    from ase_mlks.structures import twisted_bilayer

    rows = []
    for nat, (m, n) in TWIST.items():
        if nat not in (42, 114):
            continue
        atoms = twisted_bilayer("MoS2", m=m, n=n)
        atoms.calc = calc

        def ef(a=atoms):
            calc.reset()
            calc._graph = None
            return a.get_forces()

        _, t_ef, c_ef = _timed(ef, repeat=3, cpu=True)
        path = atoms.cell.bandpath("GMKG", npoints=100, pbc=atoms.pbc)
        ham = calc.get_hamiltonian(atoms)

        def bands(h=ham, k=path.kpts):
            return h.eigenvalues(k)

        _, t_bs, c_bs = _timed(bands, cpu=True)
        row = {"natoms": nat, "norb": ham.norb, "model_energy_forces_s": t_ef,
               "model_energy_forces_cpu_s": c_ef, "model_band_structure_100k_s": t_bs,
               "model_band_structure_100k_cpu_s": c_bs}
        if nat in gpaw_cells:
            try:
                from ase_mlks.reference.groundstate import run_groundstate

                t0, c0 = time.perf_counter(), time.process_time()
                gs = run_groundstate(atoms.copy(), _gpaw_settings(atoms),
                                     txt=str(Path(os.environ.get("TMPDIR", "/tmp"))
                                             / f"dpwannier_gpaw_{nat}.txt"))
                row.update(gpaw_energy_forces_wall_s=time.perf_counter() - t0,
                           gpaw_energy_forces_cpu_s=time.process_time() - c0,
                           gpaw_settings=_gpaw_settings(atoms).todict(),
                           speedup_energy_forces_cpu=(time.process_time() - c0) / c_ef,
                           speedup_energy_forces=(time.perf_counter() - t0) / t_ef,
                           model_vs_gpaw_force_mae_meV_A=1e3 * float(np.mean(np.abs(
                               atoms.get_forces() - gs.forces))),
                           model_vs_gpaw_energy_meV_atom=1e3 * float(
                               (atoms.get_potential_energy() - gs.energy) / nat))
            except ImportError as err:
                row["gpaw"] = f"not run: {err}"
        rows.append(row)
    return rows


# -- 4. large cells ----------------------------------------------------------------------------
def _large_atoms(nat: int):
    from ase_mlks.structures import twisted_bilayer_from_vectors

    atoms = twisted_bilayer_from_vectors("MoS2", *LARGE[nat])
    info = atoms.info["twist"]
    if sum(info.natoms_layers) != nat:
        raise RuntimeError(f"expected {nat} atoms, got {info.natoms_layers}")
    return atoms, info


def large_worker(model: str, nat: int, relax: bool, nk: int = 100, cores: int = 1) -> dict:
    """Runs in its own process so that the peak memory belongs to this cell alone.
    ``cores``: torch threads for the force calls, then processes sharing the
    band path (their CPU time and memory are counted)."""
    __import__("torch").set_num_threads(cores)
    atoms, info = _large_atoms(nat)
    calc = _calc(model)
    atoms.calc = calc
    row = {"natoms": nat, "angle_deg": info.angle, "strain_layer2": info.strain,
           "atoms_per_layer": list(info.natoms_layers)}
    t0 = time.perf_counter()
    total0 = t0
    if relax:
        # L-BFGS: ASE's BFGS diagonalizes the full 3N x 3N Hessian every step (N^3)
        from ase.optimize import LBFGS

        from ase_mlks.core.errors import StructureError

        start = atoms.positions.copy()
        opt = LBFGS(atoms, logfile=None)
        try:
            opt.run(fmax=0.01, steps=1000)
            row["relax_fmax"] = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        except StructureError as err:  # the model drove atoms outside its training range
            row["relax_error"] = f"after {opt.nsteps} L-BFGS steps: {err}"
            atoms.positions = start  # time the bands on the unrelaxed cell instead
            row["bands_on"] = "unrelaxed cell (relaxation failed)"
        row.update(relax_steps=opt.nsteps, relax_s=time.perf_counter() - t0)

    def ef():
        calc.reset()
        calc._graph = None
        return atoms.get_forces()

    _, row["force_call_s"], row["force_call_cpu_s"] = _timed(ef, repeat=2, cpu=True)
    path = atoms.cell.bandpath("GMKG", npoints=100, pbc=atoms.pbc)
    if nk < 100:  # a sample of the path's k-points; the 100-k time is extrapolated
        path = BandPath(path.cell, kpts=path.kpts[np.linspace(0, 99, nk).round().astype(int)])
    t0 = time.perf_counter()
    ham = calc.get_hamiltonian(atoms)
    row["build_H_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ef_level = calc.get_fermi_level()
    row["fermi_level_s"] = time.perf_counter() - t0
    t0, c0, cc0 = time.perf_counter(), time.process_time(), _children_cpu()
    bs = calc.band_structure(path=path, nbands=20, sigma=ef_level, workers=cores)
    t_bs = time.perf_counter() - t0
    cpu = time.process_time() - c0 + _children_cpu() - cc0
    row["cores"] = cores
    row["band_cpu_s_per_kpoint"] = cpu / len(path.kpts)
    row["band_kpoints_computed"] = len(path.kpts)
    row["band_s_per_kpoint"] = t_bs / len(path.kpts)
    row["band_structure_100k_20bands_s"] = t_bs * 100 / len(path.kpts)
    row["band_structure_100k_extrapolated"] = len(path.kpts) < 100
    row["norb"] = ham.norb
    row["nnz"] = ham.nnz
    e = bs.energies[0]
    row["gap_eV"] = float(e[e > ef_level].min() - e[e < ef_level].max())
    if relax and "relax_error" not in row:
        row["relax_plus_bands_total_s"] = time.perf_counter() - total0
    # The forked band workers' peak counts too: each holds its own factorization.
    row["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cores > 1:
        row["peak_rss_band_worker_MB"] = \
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row["torch_threads"] = __import__("torch").get_num_threads()
    return row


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (user + system)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def large(model: str, sizes: list[int], relax: bool, nk_large: int,
          cores: int = 1) -> list[dict]:
    rows = []
    for nat in sizes:
        cmd = [sys.executable, __file__, "--worker", str(nat), "--model", model,
               "--large-kpoints", str(100 if nat < 1000 else nk_large),
               "--cores", str(cores)]
        if relax:  # every near-commensurate cell: each strains one layer differently
            cmd.append("--relax-large")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            rows.append({"natoms": nat, "error": proc.stderr[-2000:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def _unrelaxed_line(r: dict, tag: str, against: str) -> str:
    """Table line: unrelaxed-cell force MAE (all, z) and energy error against one reference."""
    return (f"  unrelaxed: F {r[f'force_mae_meV_A_{tag}']:.1f} meV/Å (z "
            f"{r[f'force_mae_z_meV_A_{tag}']:.1f}), E "
            f"{r[f'energy_error_meV_atom_{tag}']:+.1f} meV/atom vs {against}")


def _relaxation_line(r: dict, suffix: str, label: str) -> str:
    """Table line: model vs GPAW relaxation (keys of _compare_relaxations + ``suffix``)."""
    def get(name: str) -> float:
        return r.get(f"{name}{suffix}", float("nan"))

    return (f"  {label}: Mo-Mo interlayer {get('interlayer_MoMo_start_A'):.3f} -> GPAW "
            f"{get('interlayer_MoMo_gpaw_A'):.3f} / model {get('interlayer_MoMo_model_A'):.3f} Å"
            + (f" (zero of GPAW's interlayer force at h = 0.15 Å: {zero:.3f} Å)"
               if (zero := r.get(f"interlayer_MoMo_gpaw_zero_force_h0.15_A{suffix}")) else "")
            + ";"
            f" S-S thickness GPAW {get('S_thickness_gpaw_A'):.3f} / model "
            f"{get('S_thickness_model_A'):.3f} Å; RMSD {get('relaxed_vs_gpaw_rmsd_A'):.3f} Å, "
            f"max |dz| {get('relaxed_vs_gpaw_max_dz_A'):.3f} Å; "
            f"relaxation energy GPAW {get('relax_energy_gpaw_meV'):.0f} / model "
            f"{get('relax_energy_model_meV'):.0f} meV")


def _table(res: dict) -> str:
    lines = []
    h = res.get("heldout", {})
    if "force_mae_meV_A" in h:
        lines.append(f"held-out bilayers ({h['n_structures']}; trained on {h['n_train']}): "
                     f"E {h['energy_mae_meV_atom']:.2f} meV/atom | F {h['force_mae_meV_A']:.1f}"
                     f" meV/Å | H {h.get('h_mae_meV', float('nan')):.2f} meV")
        for name in ("unstrained", "strained", "twisted"):
            if f"{name}_n" in h:
                lines.append(f"  {name} ({h[f'{name}_n']}): E "
                             f"{h[f'{name}_energy_mae_meV_atom']:.2f} meV/atom | F "
                             f"{h[f'{name}_force_mae_meV_A']:.1f} meV/Å"
                             + (f" | H {h[f'{name}_h_mae_meV']:.2f} meV "
                                f"({h[f'{name}_n_hamiltonian']} with H(R))"
                                if f"{name}_h_mae_meV" in h else ""))
    for r in h.get("h_shells", []):
        lines.append(f"  H {r['pairs']} {r['shell_A'][0]:.1f}-{r['shell_A'][1]:.1f} Å: mean |H| "
                     f"{r['mean_abs_ref_meV']:.1f} meV, MAE {r['mae_meV']:.1f} meV, slope "
                     f"{r['slope']:.2f}")
    for r in res.get("twisted", []):
        lines.append(f"{r['key']} ({r['natoms']} at.): bands MAE "
                     f"{r.get('band_mae_meV', float('nan')):.0f} meV, gap error "
                     f"{r.get('gap_error_meV', float('nan')):.0f} meV, relax max dz "
                     f"{r['relax_max_dz_A']:.3f} Å")
        if "force_mae_meV_A_fixture" in r:
            lines.append(_unrelaxed_line(r, "fixture", "the fixture "
                                         f"(k {r['reference_kpts_fixture']})"))
        if "force_mae_meV_A_kconv" in r:
            k = r["reference_kpts_kconv"]
            lines.append(_unrelaxed_line(r, "kconv", f"k {k}") + f"; fixture vs k {k}: F "
                         f"{r['force_mae_meV_A_fixture_vs_kconv']:.1f} meV/Å, E "
                         f"{r['energy_error_meV_atom_fixture_vs_kconv']:+.1f} meV/atom")
        if "interlayer_MoMo_gpaw_A" in r:
            lines.append(_relaxation_line(r, "", "vs GPAW relaxation"))
        if "interlayer_MoMo_gpaw_A_kconv" in r:
            lines.append(_relaxation_line(r, "_kconv", "vs GPAW relaxation on the denser k-grid"))
    lines.append(f"{'natoms':>7} {'model E+F s':>12} {'model bands s':>14} {'GPAW E+F s':>11}"
                 f" {'ratio':>8}")
    for r in res.get("speed", []):
        g = r.get("gpaw_energy_forces_wall_s")
        ratio = f"{r['speedup_energy_forces']:.0f}x" if g else "-"
        lines.append(f"{r['natoms']:>7} {r['model_energy_forces_s']:>12.3f} "
                     f"{r['model_band_structure_100k_s']:>14.2f} "
                     f"{(f'{g:.1f}' if g else '-'):>11} "
                     f"{ratio:>8}")
    for r in res.get("large", []):
        if "error" in r:
            lines.append(f"{r['natoms']} atoms: error")
            continue
        extra = " (extrapolated)" if r.get("band_structure_100k_extrapolated") else ""
        lines.append(f"{r['natoms']:>5} atoms: force call {r['force_call_s']:.2f} s, 100-k bands "
                     f"(20 near gap) {r['band_structure_100k_20bands_s']:.1f} s{extra}, peak "
                     f"{r['peak_rss_MB']:.0f} MB"
                     + (f", relax+bands {r['relax_plus_bands_total_s']:.0f} s"
                        if "relax_plus_bands_total_s" in r else "")
                     + (f"; relaxation FAILED {r['relax_error']}" if "relax_error" in r else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mos2-bilayer")
    p.add_argument("--data", default="data/mos2_bilayer.h5")
    p.add_argument("--unseen", nargs="*", default=[],
                   help="reference files none of whose structures were used in training")
    p.add_argument("--heldout-from", default=None,
                   help="score on this checkpoint's held-out split instead of the model's own")
    p.add_argument("--twisted", nargs="*", default=None,
                   help="HDF5 fixtures with twisted bilayers (default: tests/data/*.h5 but "
                        "the k-converged ones)")
    p.add_argument("--twisted-kconv", nargs="*", default=[KCONV_FIXTURE],
                   help="energies/forces of the same twisted cells on a denser k-grid")
    p.add_argument("--gpaw", type=int, nargs="*", default=[42],
                   help="cells (42, 114) on which GPAW runs side by side")
    p.add_argument("--large", type=int, nargs="*", default=[201, 1308])
    p.add_argument("--relax-large", action="store_true")
    p.add_argument("--large-kpoints", type=int, default=100,
                   help="k-points actually diagonalized for cells above 1000 atoms "
                        "(fewer: the 100-k time is extrapolated and flagged)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["heldout", "twisted", "speed", "large"])
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--json", default="dpwannier.json", help="result file name in --out")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--relax-steps", type=int, default=500)
    p.add_argument("--cores", type=int, default=1,
                   help="large cells: torch threads for the force calls and processes "
                        "sharing the band path (run with OMP_NUM_THREADS=1)")
    args = p.parse_args()
    global RELAX_STEPS
    RELAX_STEPS = args.relax_steps
    if args.worker is not None:
        print(json.dumps(large_worker(args.model, args.worker, args.relax_large,
                                      args.large_kpoints, args.cores)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calc = _calc(args.model)
    res: dict = {"model": args.model, "threads": os.environ.get("OMP_NUM_THREADS"),
                 "checkpoint": {k: v for k, v in getattr(calc.model, "checkpoint_meta", {})
                                .items() if k in ("created", "data_hash", "hparams")}}
    if "heldout" not in args.skip:
        res["heldout"] = heldout(calc, Path(args.data), out, [Path(x) for x in args.unseen],
                                 keys_from=args.heldout_from)
    if "twisted" not in args.skip:
        paths = [Path(x) for x in (args.twisted if args.twisted is not None
                                   else sorted(set(Path("tests/data").glob("*.h5"))
                                               - {Path(KCONV_FIXTURE)}))]
        res["twisted"] = twisted(calc, paths, out, [Path(x) for x in args.twisted_kconv])
    if "speed" not in args.skip:
        res["speed"] = speed(calc, args.gpaw)
    if "large" not in args.skip:
        res["large"] = large(args.model, args.large, args.relax_large, args.large_kpoints,
                             args.cores)
    print(_table(res))  # first: the numbers must survive a bad --json path
    path = out / args.json  # relative to --out; an absolute --json is taken as given
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
