"""ASE calculator for the 3D Gaussian-scatterer testbed solved by VAE orbital-free DFT.

The scatterers are the atoms: positions are the Gaussian centres (Angstrom), the initial
charges their amplitudes A_i (dimensionless, trained on [0, 2]), and the cell the periodic
box, a cube of edge a0 = 1 Bohr.  One particle of electron mass feels
V(r) = 1/10 sum_i A_i (2 pi)^-3/2 sigma^-3 exp(-|r - R_i|^2 / 2 sigma^2), sigma = a0/6
(minimum image); its ground state is found by latent-space descent of the DL functional.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.units import Bohr, Hartree

from ..core.calculator import MLCalculator
from ..core.errors import AseMlksError, StructureError
from .data import N_GAUSS_3D, SIGMA_3D, gauss3d_components, get_testbed
from .model import OFDFTModel
from .solver import latent_descent

AMPLITUDE_RANGE = (0.0, 2.0)  # amplitudes seen in training


def scatterer_potential(atoms: Atoms, npts: int = 18) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """Potential (E0) on the npts^3 grid x_i = i/npts a0, and the scatterers in a0.

    Returns (V (npts, npts, npts), centres (M, 3) in a0 wrapped into the box, amplitudes (M,)).
    """
    coords = np.arange(npts) / npts
    centres = np.mod(atoms.get_scaled_positions(wrap=False), 1.0)  # box edge = 1 a0
    amplitudes = atoms.get_initial_charges().astype(float)
    g, _ = gauss3d_components(centres, coords)
    pref = amplitudes / (N_GAUSS_3D * (2 * np.pi) ** 1.5 * SIGMA_3D**3)
    v = np.einsum("i,ix,iy,iz->xyz", pref, g[:, 0], g[:, 1], g[:, 2])
    return v, centres, amplitudes


def hellmann_feynman_forces(density: np.ndarray, centres: np.ndarray,
                            amplitudes: np.ndarray) -> np.ndarray:
    """-int n dV/dR_i (E0/a0), shape (M, 3); density (N, N, N) in 1/a0^3 on x_i = i/N.

    dV_i/dR_i = V_i(r) (r - R_i) / sigma^2 with the minimum-image offset; the separable
    Gaussian reduces each component to an einsum of per-axis factors.
    """
    npts = density.shape[0]
    coords = np.arange(npts) / npts
    dv = 1.0 / npts**3
    g, d = gauss3d_components(centres, coords)
    dg = g * d / SIGMA_3D**2  # derivative of the per-axis factor w.r.t. the centre
    pref = amplitudes / (N_GAUSS_3D * (2 * np.pi) ** 1.5 * SIGMA_3D**3)
    fx = np.einsum("ix,iy,iz,xyz->i", dg[:, 0], g[:, 1], g[:, 2], density)
    fy = np.einsum("ix,iy,iz,xyz->i", g[:, 0], dg[:, 1], g[:, 2], density)
    fz = np.einsum("ix,iy,iz,xyz->i", g[:, 0], g[:, 1], dg[:, 2], density)
    return -(pref * dv)[:, None] * np.stack([fx, fy, fz], axis=1)


class OFDFTCalc(MLCalculator):
    """Orbital-free DFT by energy minimization in the latent space of a density VAE.

    Parameters: ``model`` (shipped name 'gauss3d', a path, or an ``OFDFTModel``);
    ``optimizer`` of the latent descent ('lbfgs' default: converges tightly, as the
    Hellmann-Feynman forces need; 'adam' or 'gd' as in the paper), its ``steps`` (energy
    evaluations) and ``lr`` (Adam/GD); ``warm_start`` (start from the previous latent vector).
    Properties: energy (eV), free_energy, forces (eV/Angstrom, Hellmann-Feynman).
    ``get_density()`` gives the particle density on the 18^3 grid in 1/Angstrom^3.
    """

    implemented_properties = ["energy", "free_energy", "forces"]
    model_class = OFDFTModel
    default_model = "gauss3d"
    default_parameters: dict[str, Any] = {"steps": 200, "lr": None, "optimizer": "lbfgs",
                                          "warm_start": False}

    def __init__(self, model: str | OFDFTModel | None = None, **kwargs):
        super().__init__(model=model, **kwargs)
        if self.model.testbed != "gauss3d" or self.model.vae.ndim != 3:
            raise AseMlksError(
                f"OFDFTCalc needs a 3D Gaussian-scatterer model; {model!r} is "
                f"'{self.model.testbed}' (use ase_mlks.ofdft.solve for the 1D testbeds)")
        self._latent: torch.Tensor | None = None
        self.density: np.ndarray | None = None

    def check_atoms(self, atoms: Atoms) -> None:
        super().check_atoms(atoms)
        if not atoms.pbc.all():
            raise StructureError("OFDFTCalc needs a periodic box: set pbc=True on all axes")
        edge = get_testbed(self.model.testbed).length * Bohr
        if not np.allclose(atoms.cell.array, np.eye(3) * edge, atol=1e-6):
            raise StructureError(
                f"OFDFTCalc needs the cubic cell of edge 1 Bohr = {edge:.6f} Angstrom "
                f"(the model's training box); got cell {atoms.cell.array.tolist()}")
        a = atoms.get_initial_charges()
        lo, hi = AMPLITUDE_RANGE
        if np.any(a < lo - 1e-12) or np.any(a > hi + 1e-12):
            raise StructureError(
                f"scatterer amplitudes (initial charges) must lie in [{lo}, {hi}], the "
                f"training range; got min {a.min():.3g}, max {a.max():.3g}")

    def calculate(self, atoms: Atoms | None = None, properties=("energy",),
                  system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        npts = self.model.vae.shape[0]
        v, centres, amplitudes = scatterer_potential(self.atoms, npts)
        z0 = self._latent if self.parameters.warm_start else None
        z, e, n, _, _ = latent_descent(
            self.model, torch.as_tensor(v, dtype=torch.float32)[None],
            steps=self.parameters.steps, lr=self.parameters.lr,
            optimizer=self.parameters.optimizer, z0=z0)
        self._latent = z.detach()
        density = n[0].numpy().astype(np.float64)
        self.density = density
        energy = float(e[0]) * Hartree
        forces = hellmann_feynman_forces(density, centres, amplitudes) * Hartree / Bohr
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}

    def get_density(self, atoms: Atoms | None = None) -> np.ndarray:
        """Ground-state density n(r) (1/Angstrom^3) on the grid r = (i, j, k)/18 Bohr."""
        self.get_property("energy", atoms)
        return self.density / Bohr**3

    def get_latent(self, atoms: Atoms | None = None) -> np.ndarray:
        """The minimizing latent vector z (l_d,)."""
        self.get_property("energy", atoms)
        return self._latent[0].numpy()
