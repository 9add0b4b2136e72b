"""Löwdin-projected Wannier H(R) with and without localization steps, vs GPAW's bands.

One GPAW LCAO ground state (the reference level of theory), one non-self-consistent run on
the Wannier grid without any k-point symmetry, then the Wannier construction for every
requested number of localization steps from the same Bloch states. Prints a table (spread,
band errors along Γ–M–K–Γ, time) and writes JSON.

    python benchmarks/wannier_localization.py --structure monolayer --kpts 6 6 \\
        --wannier-kpts 18 18 --steps 0 5 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _structure(name: str):
    from ase_mlks.structures import bilayer, monolayer

    if name == "monolayer":
        return monolayer("MoS2")
    if name == "bilayer":  # 1x1 bilayer at the equilibrium gap
        return bilayer("MoS2")
    raise SystemExit(f"unknown structure {name!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structure", default="monolayer", choices=["monolayer", "bilayer"])
    p.add_argument("--kpts", type=int, nargs=2, default=(6, 6))
    p.add_argument("--wannier-kpts", type=int, nargs=2, default=(18, 18))
    p.add_argument("--steps", type=int, nargs="+", default=[0, 5, 20])
    p.add_argument("--npoints", type=int, default=61)
    p.add_argument("--fast", action="store_true", help="FAST GPAW settings (smoke test)")
    p.add_argument("--json", default="benchmarks/out/wannier_localization.json")
    args = p.parse_args(argv)

    from ase_mlks.reference.groundstate import run_groundstate
    from ase_mlks.reference.pipeline import check_path
    from ase_mlks.reference.settings import DEFAULT, FAST
    from ase_mlks.reference.wannier import (
        MOS2_BASIS,
        build_wannier,
        compare_bands,
        gpaw_manifold_bands,
    )

    atoms = _structure(args.structure)
    settings = (FAST if args.fast else DEFAULT).with_kpts(tuple(args.kpts))
    t0 = time.process_time()
    gs = run_groundstate(atoms, settings)
    t_scf = time.process_time() - t0
    t0 = time.process_time()
    wcalc = gs.calc.fixed_density(kpts={"size": (*args.wannier_kpts, 1), "gamma": True},
                                  nbands="nao", symmetry="off", txt=None)
    wcalc.get_potential_energy()
    t_nscf = time.process_time() - t0
    path = check_path(atoms, "GMKG", args.npoints)
    ref, all_eigs = gpaw_manifold_bands(gs.calc, path.kpts, MOS2_BASIS, return_all=True)
    nval = gs.calc.get_number_of_electrons()
    rows = []
    for steps in args.steps:
        t0 = time.process_time()
        res = build_wannier(wcalc, atoms, MOS2_BASIS, localization_steps=steps)
        dt = time.process_time() - t0
        err = compare_bands(res, path.kpts, ref, all_eigs, nval)
        loc = res.localization or {}
        spread = loc.get("spread_total", [None, None])[1]
        rows.append({"steps": steps, "spread_total_A2": spread,
                     "spread_initial_A2": loc.get("spread_total", [None])[0],
                     "centre_shift_max_A": loc.get("centre_shift_max"),
                     "band_error_max_meV": 1e3 * err["max_error"],
                     "band_error_rms_meV": 1e3 * err["rms_error"],
                     "vbm_error_meV": 1e3 * err["vbm_error"],
                     "cbm_error_meV": 1e3 * err["cbm_error"], "cpu_s": dt})
    lowdin = next((r["spread_initial_A2"] for r in rows if r["spread_initial_A2"]), None)
    for r in rows:  # no steps: the spread is that of the Löwdin orbitals, measured above
        if r["steps"] == 0:
            r["spread_total_A2"] = lowdin
    print(f"{args.structure}: SCF {t_scf:.0f} CPU-s, non-SCF {tuple(args.wannier_kpts)} "
          f"{t_nscf:.0f} CPU-s")
    print(f"{'steps':>5} {'spread Å²':>10} {'max err':>8} {'rms':>6} {'VBM':>6} {'CBM':>6} "
          f"{'CPU s':>6}")
    for r in rows:
        sp = "—" if r["spread_total_A2"] is None else f"{r['spread_total_A2']:.3f}"
        print(f"{r['steps']:>5} {sp:>10} {r['band_error_max_meV']:>8.1f} "
              f"{r['band_error_rms_meV']:>6.1f} {r['vbm_error_meV']:>6.1f} "
              f"{r['cbm_error_meV']:>6.1f} {r['cpu_s']:>6.1f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "scf_cpu_s": t_scf,
                               "nscf_cpu_s": t_nscf, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
