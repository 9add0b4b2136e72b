"""The README's main job: twisted bilayer MoS2 (21.79°, 42 atoms) on the shipped
``mos2-bilayer`` DPWannier model — energy, forces, band structure (PNG), then a BFGS
relaxation attempt.

The shipped model is an interim one (trained on the few GPAW bilayer configurations that
exist so far, see docs/dpwannier.md); if the relaxation leaves the model's training range
the calculator refuses with a clear error, and this demo reports that instead of hiding it.
For larger cells and options use ``examples/twisted_mos2.py``.
"""

import time

import matplotlib

matplotlib.use("Agg")
import numpy as np
from ase.optimize import BFGS

from ase_mlks import DPWannierCalc
from ase_mlks.core.errors import AseMlksError
from ase_mlks.structures import twist_angle, twisted_bilayer


def main() -> None:
    atoms = twisted_bilayer("MoS2", m=1, n=2)
    print(f"twisted bilayer MoS2: {twist_angle(1, 2):.2f}°, {len(atoms)} atoms")
    atoms.calc = DPWannierCalc(model="mos2-bilayer")
    t0 = time.perf_counter()
    energy = atoms.get_potential_energy()
    fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
    print(f"energy {energy:.4f} eV, max force {fmax:.4f} eV/Å "
          f"({time.perf_counter() - t0:.2f} s)")
    t0 = time.perf_counter()
    path = atoms.cell.bandpath("GMKG", npoints=60, pbc=atoms.pbc)
    bs = atoms.calc.band_structure(path=path)
    bs.plot(emin=bs.reference - 2, emax=bs.reference + 3, filename="twisted_mos2_bands.png")
    print(f"band structure: {bs.energies.shape[2]} bands x {len(path.kpts)} k-points, "
          f"Fermi level {bs.reference:.3f} eV (vacuum = 0) in "
          f"{time.perf_counter() - t0:.2f} s -> twisted_mos2_bands.png")
    try:
        BFGS(atoms, logfile="-").run(fmax=0.02, steps=50)
    except AseMlksError as err:
        print(f"relaxation stopped by the calculator: {err}")


if __name__ == "__main__":
    main()
