"""Is a GPAW-relaxed bilayer converged in its interlayer distance? A rigid layer scan.

BFGS stops when every atom's force is below ``fmax``; the force on the rigid interlayer
coordinate is the *sum* of the z forces of one layer, which in a large cell can stay well
above ``fmax`` while every atom is below it (0.35 eV/Å on each layer of the 114-atom 13.17°
cell at max |F| 0.03 eV/Å). This script takes a record's stored GPAW relaxation
(``relaxed_positions``), shifts the top layer rigidly along z by each ``--dz``, runs GPAW at
the record's own settings, and reports the net z force on each layer. The zero of the
interlayer force (mean of top and minus bottom), interpolated linearly between the scan
points, estimates the interlayer distance of the minimum at the relaxed layer shapes.

**The grid.** The interlayer force is a sum over a layer of small per-atom forces, so a
grid error that is small per atom adds up: on the 42-atom 21.79° AA cell, at the end point
of GPAW's relaxation on the h = 0.2 Å grid of the data, the net force on each layer is
−0.200 eV/Å at h = 0.2 and −0.042 eV/Å at h = 0.15, while translating the bilayer by half a
z grid spacing changes it by 0.02 only (docs/reference.md, session 21). The zeros move out
by 0.04–0.05 Å from h = 0.2 to 0.15, so scan at ``--h 0.15``. ``--translate`` evaluates
every point at several rigid translations of the whole bilayer along z and averages them
(the part of the grid error that follows the grid's phase); ``--tight`` a 100× tighter
SCF. ``--store`` keeps the summary in the record (attribute ``interlayer_scan_h<h>``), where
the relax test and the DPWannier benchmark compare with it; ``--model`` scans a DPWannier
model at the same points.

    python benchmarks/reference_interlayer_scan.py --data tests/data/mos2_twisted_kconv.h5 \\
        --key twisted_MoS2_1_2 --dz 0 -0.05 --h 0.15 --workdir runs/scan_aa \\
        [--translate 0 0.0985] [--tight] [--store] [--model mos2-bilayer]

Each point is stored in ``--workdir`` as it finishes (a rerun skips done points; points are
named by shift and translation, so one workdir holds one setting of ``--h``/``--tight``).
Prints a table and writes JSON (``--json``, in ``--workdir``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

AVERAGED = ("mo_mo", "energy", "fz_bottom", "fz_top", "interlayer_force")


def scan_point(atoms, top: np.ndarray, dz: float, calc) -> dict:
    """``calc`` (GPAW or the model) at ``atoms`` with the ``top`` layer shifted by ``dz`` Å
    along z: the net z force on each layer, their interlayer mean, energy, forces."""
    from ase_mlks.core.graph import interlayer_distance, layer_net_forces

    a = atoms.copy()
    a.positions[top, 2] += dz
    a.calc = calc
    f = a.get_forces()
    layer = top.astype(int)  # the layers of the unshifted cell, kept while one moves
    bottom_fz, top_fz = layer_net_forces(a, f, layer)
    return {"dz": dz, "mo_mo": interlayer_distance(a, layer=layer),
            "energy": float(a.get_potential_energy()),
            "fz_bottom": bottom_fz, "fz_top": top_fz,
            "interlayer_force": 0.5 * (top_fz - bottom_fz),
            "fmax": float(np.linalg.norm(f, axis=1).max()),
            "forces": np.asarray(f).round(6).tolist()}


def model_comparison(atoms, top: np.ndarray, points: list[dict], model: str) -> dict:
    """The model at every shift of the scan: its interlayer force, the zero of that force,
    and its force MAE (meV/Å) against each GPAW evaluation that stored its forces."""
    from ase_mlks import DPWannierCalc

    calc = DPWannierCalc(model=model)
    mine = {dz: scan_point(atoms, top, dz, calc) for dz in sorted({p["dz"] for p in points})}
    mae = [1e3 * float(np.abs(np.subtract(p["forces"], mine[p["dz"]]["forces"])).mean())
           if "forces" in p else None for p in points]
    return {"points": [{k: v for k, v in m.items() if k != "forces"} for m in mine.values()],
            "zero_force_mo_mo": zero_crossing(list(mine.values())),
            "force_mae_meV_A": mae}


def mean_over_translations(points: list[dict]) -> list[dict]:
    """One point per shift ``dz``: the mean of its evaluations at the rigid translations
    (keys of ``AVERAGED``), with ``spread`` = max − min of the interlayer force (eV/Å)."""
    by_dz: dict[float, list[dict]] = {}
    for p in points:
        by_dz.setdefault(p["dz"], []).append(p)
    out = []
    for dz, group in sorted(by_dz.items()):
        mean = {k: float(np.mean([p[k] for p in group])) for k in AVERAGED}
        forces = [p["interlayer_force"] for p in group]
        out.append({"dz": dz, **mean, "n": len(group), "spread": max(forces) - min(forces)})
    return out


def zero_crossing(points: list[dict]) -> float | None:
    """Interlayer Mo–Mo (Å) where the interlayer force changes sign, linearly interpolated
    between neighbouring scan points; None if it does not change sign in the scan."""
    pts = sorted(points, key=lambda p: p["mo_mo"])
    for a, b in zip(pts[:-1], pts[1:]):
        fa, fb = a["interlayer_force"], b["interlayer_force"]
        if fa == 0:
            return a["mo_mo"]
        if fa * fb <= 0:  # a sign change, or a zero at b (then this returns b's distance)
            return a["mo_mo"] + fa / (fa - fb) * (b["mo_mo"] - a["mo_mo"])
    return None


def point_path(workdir: Path, dz: float, translate: float) -> Path:
    """Where one evaluation is kept; untranslated points keep their session-20 names."""
    name = f"dz{dz:+.3f}" + (f"_t{translate:+.5f}" if translate else "")
    return workdir / f"{name}.json"


def main() -> None:
    from ase_mlks.core.dataset import StructureDataset
    from ase_mlks.core.graph import assign_layers
    from ase_mlks.reference.relax import reference_calculator
    from ase_mlks.reference.settings import LCAOSettings, gpts_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--dz", type=float, nargs="+", required=True, help="top-layer shifts (Å)")
    p.add_argument("--translate", type=float, nargs="+", default=[0.0],
                   help="rigid translations of the whole bilayer along z (Å) at which every "
                        "shift is evaluated and averaged (the grid-ripple check)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--json", default="interlayer_scan.json")
    p.add_argument("--tight", action="store_true",
                   help="100x tighter SCF (density and energy criteria), to rule the SCF "
                        "out; give it its own --workdir")
    p.add_argument("--h", type=float, default=None,
                   help="grid spacing (Å) instead of the record's; give it its own --workdir")
    p.add_argument("--store", action="store_true",
                   help="keep the scan's summary (grid, shifts, mean forces and energies, "
                        "zero) in the record, attribute interlayer_scan_h<h>, where tests "
                        "and benchmarks compare relaxations with it")
    p.add_argument("--model", default=None,
                   help="also scan this DPWannier model (e.g. mos2-bilayer): its interlayer "
                        "force at every point and its force MAE against each GPAW point")
    args = p.parse_args()

    with StructureDataset(args.data, "r") as ds:
        rec = ds.read(args.key)
    if "relaxed_positions" not in rec:
        raise SystemExit(f"error: {args.data}:{args.key} holds no GPAW relaxation")
    atoms = rec["atoms"]
    atoms.positions = rec["relaxed_positions"]
    settings = LCAOSettings.fromdict(json.loads(rec["attrs"]["settings"]))
    if args.tight:
        settings = replace(settings, convergence={
            k: settings.convergence[k] * 1e-2 for k in ("energy", "density")}, maxiter=400)
    if args.h is not None:
        settings = replace(settings, h=args.h)
    layer = assign_layers(atoms)
    top = layer == layer.max()
    args.workdir.mkdir(parents=True, exist_ok=True)
    points = []
    for t in args.translate:
        moved = atoms.copy()
        moved.positions[:, 2] += t
        for dz in args.dz:
            path = point_path(args.workdir, dz, t)
            if not path.exists():
                calc = reference_calculator(moved, settings, txt=str(path.with_suffix(".txt")))
                res = scan_point(moved, top, dz, calc)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(res))
                tmp.replace(path)
            points.append(dict(json.loads(path.read_text()), translate=t))
    hz = atoms.cell[2, 2] / gpts_for(atoms, settings.h)[2]
    print(f"{args.key} ({len(atoms)} atoms, k {settings.kpts}, h {settings.h} Å, "
          f"z grid spacing {hz:.5f} Å):")
    print(f"{'dz (Å)':>8} {'transl.':>8} {'Mo-Mo (Å)':>10} {'F top':>8} {'F bottom':>9} "
          f"{'F inter':>8} {'E (eV)':>12}")
    for r in points:
        print(f"{r['dz']:>8.3f} {r['translate']:>8.4f} {r['mo_mo']:>10.3f} {r['fz_top']:>8.3f} "
              f"{r['fz_bottom']:>9.3f} {r['interlayer_force']:>8.3f} {r['energy']:>12.4f}")
    means = mean_over_translations(points)
    if len(args.translate) > 1:
        print(f"mean over the {len(args.translate)} translations:")
        for r in means:
            print(f"{r['dz']:>8.3f} {'mean':>8} {r['mo_mo']:>10.3f} {r['fz_top']:>8.3f} "
                  f"{r['fz_bottom']:>9.3f} {r['interlayer_force']:>8.3f} {r['energy']:>12.4f}"
                  f"   (interlayer force spread {r['spread']:.3f})")
    zero = zero_crossing(means)
    print("zero interlayer force at Mo-Mo "
          + (f"{zero:.3f} Å" if zero is not None else "outside the scan"))
    model = None
    if args.model:
        model = model_comparison(atoms, top, points, args.model)
        print(f"model {args.model}: interlayer force "
              + ", ".join(f"{m['interlayer_force']:.3f}" for m in model["points"])
              + " eV/Å at Mo-Mo " + ", ".join(f"{m['mo_mo']:.3f}" for m in model["points"])
              + "; zero at " + (f"{model['zero_force_mo_mo']:.3f} Å"
                                if model["zero_force_mo_mo"] is not None else "outside the scan"))
        for r, mae in zip(points, model["force_mae_meV_A"]):
            if mae is not None:
                print(f"  force MAE vs GPAW at dz {r['dz']:+.3f}, translation "
                      f"{r['translate']:.4f}: {mae:.1f} meV/Å")
    if args.store:
        from ase_mlks.reference.relax import scan_attribute, store_interlayer_scan

        store_interlayer_scan(args.data, args.key, {
            "h": settings.h, "kpts": list(settings.kpts), "tight": args.tight,
            "translate": args.translate, "means": means, "zero_force_mo_mo": zero,
            "command": "python benchmarks/reference_interlayer_scan.py "
                       + " ".join(sys.argv[1:])})
        print(f"stored in {args.data}:{args.key}, attribute {scan_attribute(settings.h)}")
    (args.workdir / args.json).write_text(json.dumps(
        {"data": str(args.data), "key": args.key, "kpts": list(settings.kpts),
         "h": settings.h, "z_grid_spacing": hz, "tight": args.tight,
         "translate": args.translate, "points": points, "means": means,
         "zero_force_mo_mo": zero, "model": model}, indent=1))


if __name__ == "__main__":
    main()
