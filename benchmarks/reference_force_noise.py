"""How precise are the GPAW reference forces? Rerun stored records, rigidly translated.

A rigid translation changes no physical force, but it moves the atoms relative to GPAW's
real-space grid (the "egg-box" effect) and restarts the SCF, so the change of the forces is
the noise of the reference itself — the floor below which no force field can be scored
against this data. Each record is rerun at its stored settings, translated by ``--shift``
(default about half a grid spacing along every axis; repeat the option for several
translations); with ``--tight`` also untranslated with a 100× tighter density convergence,
which isolates the SCF part. The spurious net force (Σ_i F_i, zero for any
translation-invariant model) of every stored record is reported too.

With ``--model`` the DPWannier model is scored against the stored forces, against each
translated rerun and against the mean of all n GPAW evaluations (stored + translated),
whose egg-box noise is about 1/√n of one evaluation's: how much of the model's measured
error is the reference's.

Translations measure only the part of the grid error that changes with the grid's phase.
``--finer-h 0.15`` reruns a record untranslated on a finer grid: the difference is the
discretization error that every h = 0.2 Å evaluation shares (on the relaxed 21.79° AA cell,
15 meV/Å MAE, where two evaluations translated along z differ by 1.8; docs/reference.md),
and the model is scored against it too.

    python benchmarks/reference_force_noise.py --data data/mos2_bilayer_strained.h5 \\
        --keys bs00006 [--shift 0.1 0.1 0.1 [--shift ...]] [--tight] [--finer-h 0.15] \\
        [--model mos2-bilayer]

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np


def net_force_stats(path: Path) -> dict:
    """Spurious net force |Σ_i F_i| of every record with forces (eV/Å), and per atom."""
    import h5py

    nets, per_atom = [], []
    with h5py.File(path, "r") as f:
        for g in f.values():
            if "forces" not in g:
                continue
            forces = g["forces"][()]
            nets.append(float(np.linalg.norm(forces.sum(0))))
            # spread evenly: the per-component drift each atom carries
            per_atom.append(float(np.abs(forces.mean(0)).mean()))
    return {"n_records": len(nets), "net_force_mean_eV_A": float(np.mean(nets)),
            "net_force_max_eV_A": float(np.max(nets)),
            "drift_per_atom_component_meV_A": 1e3 * float(np.mean(per_atom))}


def rerun(path: Path, key: str, shifts: list[np.ndarray], tight: bool, txtdir: Path,
          finer_h: float | None = None) -> dict:
    """Forces of record ``key`` recomputed translated by each of ``shifts`` (Å) / with a
    tight SCF / untranslated on a grid of spacing ``finer_h`` (Å); each variant's forces
    (eV/Å, (N, 3)) are kept for :func:`score_model`."""
    from ase_mlks.core.dataset import StructureDataset
    from ase_mlks.reference.groundstate import run_groundstate
    from ase_mlks.reference.settings import LCAOSettings

    with StructureDataset(path, "r") as ds:
        rec = ds.read(key)
    settings = LCAOSettings.fromdict(json.loads(rec["attrs"]["settings"]))
    f_ref = np.asarray(rec["forces"], float)
    # the first keeps the name older JSON used
    variants = {("translated" if n == 0 else f"translated {n + 1}"): (settings, d)
                for n, d in enumerate(shifts)}
    if tight:
        # no "forces" criterion: GPAW would then compute LCAO forces in every SCF iteration
        tighter = {"energy": settings.convergence["energy"] * 1e-3,
                   "density": settings.convergence["density"] * 1e-2}
        variants["tight SCF"] = (replace(settings, convergence=tighter), np.zeros(3))
    if finer_h is not None:  # a discretization error, unlike the translations' scatter
        variants[f"h {finer_h:g}"] = (replace(settings, h=finer_h), np.zeros(3))
    out = {"key": key, "mean_abs_force_meV_A": 1e3 * float(np.abs(f_ref).mean())}
    for name, (s, d) in variants.items():
        atoms = rec["atoms"].copy()
        atoms.positions += d
        gs = run_groundstate(atoms, s, txt=str(txtdir / f"{key}_{name.replace(' ', '_')}.txt"))
        diff = gs.forces - f_ref
        de = 1e3 * (gs.energy - float(rec["energy"])) / len(atoms)
        out[name] = {"force_mae_meV_A": 1e3 * float(np.abs(diff).mean()),
                     "force_max_meV_A": 1e3 * float(np.abs(diff).max()),
                     "energy_change_meV_atom": de,
                     "cpu_s": gs.cpu_time, "shift_A": [float(x) for x in d],
                     "forces": np.asarray(gs.forces, float).tolist()}
    return out


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return 1e3 * float(np.abs(a - b).mean())


def score_model(path: Path, key: str, run: dict, model: str) -> dict:
    """Force MAE (meV/Å) of a DPWannier model against the stored forces, each translated
    rerun and the mean of all GPAW evaluations; plus the evaluations' own scatter.

    The scatter of n evaluations about their mean, × sqrt(n / (n - 1)), estimates the MAE
    of one evaluation about the noise-free forces (for independent noise)."""
    from ase_mlks.core.dataset import StructureDataset
    from ase_mlks.dpwannier import DPWannierCalc

    with StructureDataset(path, "r") as ds:
        rec = ds.read(key)
    atoms = rec["atoms"]
    atoms.calc = DPWannierCalc(model=model)
    f_model = atoms.get_forces()
    evaluations = {"stored": np.asarray(rec["forces"], float)}
    evaluations.update({name: np.asarray(v["forces"]) for name, v in run.items()
                        if name.startswith("translated")})
    stack = np.stack(list(evaluations.values()))
    mean = stack.mean(axis=0)
    n = len(stack)
    out = {f"model_vs_{name}_meV_A": _mae(f_model, f) for name, f in evaluations.items()}
    out.update(n_evaluations=n, model_vs_mean_meV_A=_mae(f_model, mean))
    for name, v in run.items():  # finer grids: scored, not averaged with the stored grid
        if name.startswith("h "):
            out[f"model_vs_{name.replace(' ', '')}_meV_A"] = _mae(f_model, np.asarray(v["forces"]))
    if n > 1:
        scatter = np.mean([_mae(f, mean) for f in stack])
        out["noise_one_evaluation_meV_A"] = float(scatter * np.sqrt(n / (n - 1)))
    return out


def _model_line(key: str, m: dict) -> str:
    """Table line: the model's force MAE against each GPAW evaluation and their mean."""
    parts = [f"{k[len('model_vs_'):-len('_meV_A')]} {v:.1f}" for k, v in m.items()
             if k.startswith("model_vs_")]
    noise = m.get("noise_one_evaluation_meV_A")
    tail = f"; one evaluation's noise ≈ {noise:.1f}" if noise is not None else ""
    return f"{key}: model force MAE vs " + ", ".join(parts) + f" meV/Å{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/mos2_bilayer_strained.h5"))
    p.add_argument("--keys", nargs="*", default=["bs00006"],
                   help="records to rerun (none: only the net-force statistics)")
    p.add_argument("--shift", type=float, nargs=3, action="append", default=None,
                   help="rigid translation, Å (default 0.1 0.1 0.1: ~half of the 0.2 Å grid "
                        "spacing); repeat for several translated reruns")
    p.add_argument("--tight", action="store_true", help="also rerun with a tight SCF")
    p.add_argument("--finer-h", type=float, default=None,
                   help="also rerun untranslated on this grid spacing (Å), e.g. 0.15: the "
                        "discretization error of the stored forces (given alone, without "
                        "--shift, no translated rerun is made)")
    p.add_argument("--model", default=None,
                   help="also score this DPWannier model (name or checkpoint) against the "
                        "stored, translated and averaged forces")
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/reference_force_noise.json"))
    args = p.parse_args(argv)

    default_shift = [] if args.finer_h is not None else [(0.1, 0.1, 0.1)]
    shifts = [np.array(d) for d in (args.shift or default_shift)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    res = {"data": str(args.data), "shift_A": [d.tolist() for d in shifts],
           "net_force": net_force_stats(args.data), "reruns": []}
    for key in args.keys:
        run = rerun(args.data, key, shifts, args.tight, args.json.parent, args.finer_h)
        if args.model:
            run["model"] = score_model(args.data, key, run, args.model)
        res["reruns"].append(run)
        args.json.write_text(json.dumps(res, indent=1))  # keep what finished

    nf = res["net_force"]
    print(f"{args.data}: {nf['n_records']} records, spurious net force |ΣF| mean "
          f"{nf['net_force_mean_eV_A']:.3f} eV/Å (max {nf['net_force_max_eV_A']:.3f}), "
          f"drift {nf['drift_per_atom_component_meV_A']:.1f} meV/Å per atom and component")
    print(f"{'record':<10} {'variant':<11} {'|ΔF| MAE':>10} {'max':>8} {'ΔE/atom':>9} {'CPU s':>7}"
          "   (meV/Å, meV/Å, meV)")
    for r in res["reruns"]:
        for name, v in r.items():
            if isinstance(v, dict) and "force_mae_meV_A" in v:
                print(f"{r['key']:<10} {name:<11} {v['force_mae_meV_A']:>10.1f} "
                      f"{v['force_max_meV_A']:>8.1f} {v['energy_change_meV_atom']:>9.2f} "
                      f"{v['cpu_s']:>7.0f}")
        if "model" in r:
            print(_model_line(r["key"], r["model"]))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
