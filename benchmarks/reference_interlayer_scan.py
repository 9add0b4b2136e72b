"""Is a GPAW-relaxed bilayer converged in its interlayer distance? A rigid layer scan.

BFGS stops when every atom's force is below ``fmax``; the force on the rigid interlayer
coordinate is the *sum* of the z forces of one layer, which in a large cell can stay well
above ``fmax`` while every atom is below it (0.35 eV/Å on each layer of the 114-atom 13.17°
cell at max |F| 0.03 eV/Å). This script takes a record's stored GPAW relaxation
(``relaxed_positions``), shifts the top layer rigidly along z by each ``--dz``, runs GPAW at
the record's own settings, and reports the net z force on each layer. The zero of the
interlayer force (mean of top and minus bottom), interpolated linearly between the scan
points, estimates the interlayer distance of the minimum at the relaxed layer shapes.
Energies are printed too: compare them. In the session-20 scans (docs/reference.md) GPAW's
energies and forces disagree by 3–8 meV per 0.05 Å of shift, so the two put the minimum
0.04–0.05 Å apart; that is unresolved.

    python benchmarks/reference_interlayer_scan.py --data tests/data/mos2_twisted_2_3.h5 \\
        --key twisted_MoS2_2_3 --dz 0 0.05 0.10 --workdir runs/scan23 [--tight]

Each point is stored in ``--workdir`` as it finishes (a rerun skips done points). Prints a
table and writes JSON (``--json``, in ``--workdir``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np


def scan_point(atoms, top: np.ndarray, dz: float, settings, txt: str | None = None) -> dict:
    """GPAW at ``atoms`` with the ``top`` layer shifted by ``dz`` Å along z."""
    from ase_mlks.core.graph import interlayer_distance, layer_net_forces
    from ase_mlks.reference.relax import reference_calculator

    a = atoms.copy()
    a.positions[top, 2] += dz
    a.calc = reference_calculator(a, settings, txt=txt)
    f = a.get_forces()
    layer = top.astype(int)  # the layers of the unshifted cell, kept while one moves
    bottom_fz, top_fz = layer_net_forces(a, f, layer)
    return {"dz": dz, "mo_mo": interlayer_distance(a, layer=layer),
            "energy": float(a.get_potential_energy()),
            "fz_bottom": bottom_fz, "fz_top": top_fz,
            "interlayer_force": 0.5 * (top_fz - bottom_fz),
            "fmax": float(np.linalg.norm(f, axis=1).max())}


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


def main() -> None:
    from ase_mlks.core.dataset import StructureDataset
    from ase_mlks.core.graph import assign_layers
    from ase_mlks.reference.settings import LCAOSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--dz", type=float, nargs="+", required=True, help="top-layer shifts (Å)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--json", default="interlayer_scan.json")
    p.add_argument("--tight", action="store_true",
                   help="100x tighter SCF (density and energy criteria), to rule the SCF "
                        "out; give it its own --workdir (points are kept by shift)")
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
    layer = assign_layers(atoms)
    top = layer == layer.max()
    args.workdir.mkdir(parents=True, exist_ok=True)
    points = []
    for dz in args.dz:
        path = args.workdir / f"dz{dz:+.3f}.json"
        if not path.exists():
            res = scan_point(atoms, top, dz, settings, txt=str(path.with_suffix(".txt")))
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res))
            tmp.replace(path)
        points.append(json.loads(path.read_text()))
    print(f"{args.key} ({len(atoms)} atoms, k {settings.kpts}):")
    print(f"{'dz (Å)':>8} {'Mo-Mo (Å)':>10} {'F top':>8} {'F bottom':>9} {'F inter':>8} "
          f"{'E (eV)':>12}")
    for r in points:
        print(f"{r['dz']:>8.3f} {r['mo_mo']:>10.3f} {r['fz_top']:>8.3f} {r['fz_bottom']:>9.3f} "
              f"{r['interlayer_force']:>8.3f} {r['energy']:>12.4f}")
    zero = zero_crossing(points)
    print("zero interlayer force at Mo-Mo "
          + (f"{zero:.3f} Å" if zero is not None else "outside the scan"))
    (args.workdir / args.json).write_text(json.dumps(
        {"data": str(args.data), "key": args.key, "kpts": list(settings.kpts),
         "points": points, "zero_force_mo_mo": zero}, indent=1))


if __name__ == "__main__":
    main()
