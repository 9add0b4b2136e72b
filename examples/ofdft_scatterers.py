"""Orbital-free ground states of the 3D Gaussian-scatterer testbed through ASE.

Ten scatterers are atoms (positions = Gaussian centres in a 1-Bohr periodic cube, initial
charges = amplitudes). OFDFTCalc finds the ground state by descent in the latent space of
the shipped density VAE; the exact ground state of the same potential (sparse eigensolver)
is computed beside it. Then one scatterer is moved along x and the energy profile and the
Hellmann-Feynman force are compared with the exact ones. Writes ofdft_scatterers.png.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from ase import Atoms
from ase.units import Bohr, Hartree

from ase_mlks.ofdft import OFDFTCalc, get_testbed
from ase_mlks.ofdft.calculator import scatterer_potential
from ase_mlks.ofdft.data import ground_state


def exact_energy(atoms: Atoms) -> tuple[float, np.ndarray]:
    """Exact ground-state energy (eV) and density (grid, 1/Bohr^3) of the same potential."""
    v, _, _ = scatterer_potential(atoms)
    e, n = ground_state(get_testbed("gauss3d"), v)
    return e * Hartree, n


def main() -> None:
    rng = np.random.default_rng(7)
    atoms = Atoms("X10", scaled_positions=rng.random((10, 3)), cell=np.eye(3) * Bohr,
                  pbc=True, charges=rng.uniform(0, 2, 10))
    atoms.calc = OFDFTCalc(model="gauss3d")
    e_ml = atoms.get_potential_energy()
    e_ex, n_ex = exact_energy(atoms)
    n_ml = atoms.calc.get_density() * Bohr**3  # 1/Å^3 -> 1/Bohr^3
    dv = 1.0 / n_ex.size
    print(f"energy: latent descent {e_ml:.5f} eV, exact {e_ex:.5f} eV, "
          f"difference {1e3 * (e_ml - e_ex):+.2f} meV")
    print(f"integrated density error: {np.abs(n_ml - n_ex).sum() * dv:.4f}")

    shifts = np.linspace(-0.1, 0.1, 9) * Bohr
    x0 = atoms.positions[0, 0]
    e_path, f_path, e_exact = [], [], []
    for dx in shifts:
        atoms.positions[0, 0] = x0 + dx
        e_path.append(atoms.get_potential_energy())
        f_path.append(atoms.get_forces()[0, 0])
        e_exact.append(exact_energy(atoms)[0])
    atoms.positions[0, 0] = x0
    fd = -np.gradient(np.array(e_exact), shifts)
    print(" dx (Å)   E_ML (eV)   E_exact (eV)   F_x ML (eV/Å)   -dE_exact/dx (eV/Å)")
    for row in zip(shifts, e_path, e_exact, f_path, fd):
        print(" {:+.4f}  {:10.5f}  {:12.5f}  {:14.4f}  {:18.4f}".format(*row))

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(shifts, e_exact, "o", label="exact")
    a.plot(shifts, e_path, "-", label="OFDFTCalc (latent descent)")
    a.set_xlabel("Δx of scatterer 0 (Å)")
    a.set_ylabel("E (eV)")
    a.legend()
    b.plot(n_ex[:, :, 9].ravel(), n_ml[:, :, 9].ravel(), ".", ms=2)
    lim = [n_ex.min(), n_ex.max()]
    b.plot(lim, lim, "k-", lw=0.5)
    b.set_xlabel("exact n (1/Bohr³), plane z = 1/2")
    b.set_ylabel("latent-descent n")
    fig.tight_layout()
    fig.savefig("ofdft_scatterers.png", dpi=120)


if __name__ == "__main__":
    main()
