"""Twisted bilayer MoS2 with DPWannierCalc: build, relax, band structure, plot.

    python examples/twisted_mos2.py [--m 3 --n 4] [--fmax 0.01] [--out bands.png]

(3, 4) is the 9.43° cell with 222 atoms; (1, 2) = 21.79° / 42 atoms runs in seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase.optimize import BFGS

from ase_mlks.dpwannier import DPWannierCalc
from ase_mlks.structures import twist_angle, twisted_bilayer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=3)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--fmax", type=float, default=0.01)
    p.add_argument("--model", default="mos2-bilayer")
    p.add_argument("--out", default="bands.png")
    args = p.parse_args()

    atoms = twisted_bilayer("MoS2", m=args.m, n=args.n)
    print(f"twist {twist_angle(args.m, args.n):.2f}°, {len(atoms)} atoms")
    atoms.calc = DPWannierCalc(model=args.model)
    z0 = atoms.positions[:, 2].copy()

    t0 = time.perf_counter()
    BFGS(atoms, logfile="-").run(fmax=args.fmax)
    dz = atoms.positions[:, 2] - z0
    print(f"relaxed in {time.perf_counter() - t0:.1f} s; out-of-plane displacements "
          f"{dz.min():+.3f} .. {dz.max():+.3f} Å")

    path = atoms.cell.bandpath("GMKG", npoints=120, pbc=atoms.pbc)
    t0 = time.perf_counter()
    bs = atoms.calc.band_structure(path=path)
    ef = atoms.calc.get_fermi_level()
    e = bs.energies[0]
    gap = e[e > ef].min() - e[e < ef].max()
    print(f"band structure in {time.perf_counter() - t0:.1f} s: Fermi level {ef:.3f} eV "
          f"(vs vacuum), gap {gap:.3f} eV, {atoms.calc.get_hamiltonian().norb} Wannier orbitals")
    bs.plot(emin=-2, emax=3, filename=args.out)
    print(f"wrote {args.out}")
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
