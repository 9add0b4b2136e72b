"""A tour of the shared core on an analytic model (no trained network, no DFT needed).

Graphene p_z tight binding through the same calculator API every ase_mlks model has:
band structure along an ASE BandPath, Fermi level, DOS, and the sparse solver on a
16,000-orbital disordered sheet.  Writes PNGs to the current directory.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from ase.build import graphene

from ase_mlks.testing import PzTightBindingCalc


def main() -> None:
    atoms = graphene(a=2.46, vacuum=8.0)
    atoms.pbc = (True, True, False)
    atoms.calc = PzTightBindingCalc(kpts=(24, 24, 1))
    print(f"Fermi level: {atoms.calc.get_fermi_level():.4f} eV")
    bs = atoms.calc.band_structure(atoms.cell.bandpath("GMKG", npoints=120, pbc=atoms.pbc))
    bs.plot(emin=-9, emax=9, filename="graphene_bands.png")
    energies, dos = atoms.calc.get_dos(width=0.15)
    plt.figure()
    plt.plot(energies, dos)
    plt.xlabel("E (eV)")
    plt.ylabel("DOS (states/eV/cell)")
    plt.savefig("graphene_dos.png", dpi=120)
    big = graphene(a=2.46, vacuum=8.0).repeat((90, 90, 1))
    big.pbc = (True, True, False)
    rng = np.random.default_rng(0)
    calc = PzTightBindingCalc(onsite=rng.normal(0, 0.3, len(big)))
    ham = calc.build_hamiltonian(big)
    e = ham.eigenvalues([[0, 0, 0]], nbands=10, sigma=0.0)
    print(f"{ham.norb} orbitals: 10 states nearest 0 eV at Γ: {np.round(e[0], 4)}")
    print("wrote graphene_bands.png, graphene_dos.png")


if __name__ == "__main__":
    main()
