"""GW band structures from a GPAW ground state, without running GW.

``GWCorrection`` post-processes a GPAW calculator: it encodes |psi_nk|, the pseudobands super
states and the density with the crystal VAEs and predicts Sigma_nk = eps_GW - eps_DFT with
the GW head (Eq. 3 of Hou, Wu & Qiu 2024). ``GWCalc`` wraps a DFT calculator so that its
``get_eigenvalues`` are the corrected energies and ASE's band-structure tools work unchanged.

Material context (super states, density) always comes from the Gamma-centred 6x6 k-grid of
the training data (IBZ k-points with their weights); if the given calculator is not on
that grid or lacks empty bands up to E_F + 9 eV, a non-self-consistent GPAW run on it is
made (its density is kept).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.dft.kpoints import BandPath, get_monkhorst_pack_size_and_offset
from ase.spectrum.band_structure import BandStructure

from ase_mlks.core.calculator import MLCalculator
from ase_mlks.core.errors import AseMlksError
from ase_mlks.reference.kohnsham import non_scf

from .data import GridSpec, check_slab, density_grid, state_moduli, super_states
from .model import GWModel
from .trainer import scale_fields

CONTEXT_KMESH = 6  # the uniform k-grid of the training data (paper: 6x6x1)
EMPTY_BANDS = 20  # empty bands of the context run; reaches E_F + 9 eV in TMDs


@torch.no_grad()
def encode_context(model: GWModel, super_moduli: np.ndarray, super_energies: np.ndarray,
                   density: np.ndarray) -> torch.Tensor:
    """Material context of Eq. (3) from raw super states (nsup, nz, n1, n2), their energies
    (eV from E_F) and the density (nz, n1, n2)."""
    sup_x, _ = scale_fields(super_moduli)
    rho_x, _ = scale_fields(density[None])
    return model.context(torch.from_numpy(sup_x),
                         torch.as_tensor(super_energies, dtype=torch.float32),
                         torch.from_numpy(rho_x[0]))


@torch.no_grad()
def encode_states(model: GWModel, moduli: np.ndarray, energies: np.ndarray,
                  context: torch.Tensor) -> torch.Tensor:
    """Raw head features (N, F) of states with raw moduli (..., nz, n1, n2) and energies
    (...) in eV from E_F (same leading shape), for a material with ``context``."""
    x, _ = scale_fields(moduli.reshape(-1, *moduli.shape[-3:]))
    mu = torch.cat([model.state_vae.embed(torch.from_numpy(c))
                    for c in np.array_split(x, max(1, len(x) // 128))])
    return model.features(mu, torch.as_tensor(np.ravel(energies), dtype=torch.float32), context)


class HeadNotTrainedError(AseMlksError):
    """The model's GW head has not been fitted to G0W0 data, so it cannot predict."""


def _nocc(calc) -> int:
    return int(round(calc.get_number_of_electrons() / 2))


def _on_context_grid(calc, mesh: int) -> bool:
    """Is ``calc`` on the Gamma-centred mesh x mesh x 1 grid (full or symmetry-reduced)?"""
    try:
        size, offset = get_monkhorst_pack_size_and_offset(np.asarray(calc.get_bz_k_points()))
    except ValueError:
        return False
    return tuple(size) == (mesh, mesh, 1) and np.allclose(offset, 0)


def context_calculator(calc):
    """``calc`` itself if it is on the Gamma-centred 6x6 grid (as GPAW reduces it by
    symmetry; k-point weights are used) with bands up to E_F + 9 eV, else a
    non-self-consistent GPAW run on that grid from its density."""
    nb_needed = _nocc(calc) + EMPTY_BANDS
    if _on_context_grid(calc, CONTEXT_KMESH) and calc.get_number_of_bands() >= nb_needed:
        return calc
    kpts = {"size": (CONTEXT_KMESH, CONTEXT_KMESH, 1), "gamma": True}
    return non_scf(calc, kpts, nbands=nb_needed + 4, converge_bands=nb_needed, symmetry=None)


class GWCorrection:
    """Quasiparticle corrections for GPAW ground states of 2D materials.

    model: shipped name (``"c2d-pbe"`` -> ``pretrained/gw-c2d-pbe.pt``), path or GWModel.
    """

    def __init__(self, model: str | GWModel = "c2d-pbe", verbose: bool = False):
        if isinstance(model, GWModel):
            self.model = model.eval()
        else:
            self.model = GWModel.load(model).eval()
        hp = self.model.hparams
        self.spec = GridSpec(nz=hp["nz"], window=hp["window"])
        self.edges = tuple(hp["super_edges"])
        self.verbose = verbose
        self.timings: dict[str, float] = {}
        self._contexts: dict[int, tuple[Any, torch.Tensor]] = {}

    # -- inputs ---------------------------------------------------------------------------
    def context_calculator(self, calc):
        """A calculator with all states on the full 6x6 grid up to E_F + 9 eV."""
        return context_calculator(calc)

    def material_context(self, calc) -> torch.Tensor:
        """Encoded super states + density of ``calc``'s material (cached per calculator);
        empty, with no extra DFT run, when the head does not use them."""
        if not self.model.uses_context:
            return torch.zeros(0)
        key = id(calc)
        if key not in self._contexts:
            t0 = time.perf_counter()
            ctx_calc = self.context_calculator(calc)
            t1 = time.perf_counter()
            sup, energies, _ = super_states(ctx_calc, self.spec, self.edges)
            ctx = encode_context(self.model, sup, energies, density_grid(ctx_calc, self.spec))
            self.timings.update(context_dft_s=t1 - t0, context_encode_s=time.perf_counter() - t1)
            self._contexts[key] = (calc, ctx)  # keep calc alive so its id stays unique
        return self._contexts[key][1]

    def _band_range(self, calc, bands: tuple[int, int] | None) -> tuple[int, int]:
        nocc = _nocc(calc)
        n1, n2 = bands if bands is not None else (max(nocc - 4, 0), nocc + 4)
        if not 0 <= n1 < n2 <= calc.get_number_of_bands():
            raise ValueError(f"bands={bands!r}: need 0 <= n1 < n2 <= "
                             f"{calc.get_number_of_bands()} (the calculator's band count)")
        return n1, n2

    # -- predictions ----------------------------------------------------------------------
    @torch.no_grad()
    def state_features(self, calc, bands: tuple[int, int] | None = None, context_calc=None
                       ) -> tuple[torch.Tensor, np.ndarray]:
        """Raw head inputs (ns*nk*nb, F) of bands n1..n2-1 at ``calc``'s k-points, and the
        DFT energies (ns, nk, nb) in eV. ``context_calc`` (default ``calc``) supplies the
        material context (super states, density)."""
        check_slab(calc.get_atoms())
        ctx = self.material_context(context_calc if context_calc is not None else calc)
        n1, n2 = self._band_range(calc, bands)
        mod = state_moduli(calc, range(n1, n2), self.spec)  # (ns, nk, nb, nz, n1, n2)
        ns, nk = mod.shape[:2]
        eps = np.array([[calc.get_eigenvalues(kpt=k, spin=s)[n1:n2] for k in range(nk)]
                        for s in range(ns)])
        return encode_states(self.model, mod, eps - calc.get_fermi_level(), ctx), eps

    @torch.no_grad()
    def corrections(self, calc, bands: tuple[int, int] | None = None,
                    context_calc=None) -> np.ndarray:
        """Sigma_nk = eps_GW - eps_DFT (eV), shape (spins, kpts, n2 - n1), at ``calc``'s
        k-points. ``context_calc`` (default ``calc``) supplies the material context."""
        if not bool(self.model.head_trained):
            raise HeadNotTrainedError(
                "this GW model's head has not been trained on G0W0 data (only its VAEs are); "
                "it cannot predict quasiparticle corrections — see docs/gw.md")
        t0 = time.perf_counter()
        feats, eps = self.state_features(calc, bands, context_calc)
        sigma = self.model(feats).numpy().reshape(eps.shape)
        self.timings["predict_s"] = time.perf_counter() - t0
        return sigma

    def quasiparticle_energies(self, calc, bands: tuple[int, int] | None = None) -> np.ndarray:
        """eps_DFT + Sigma (eV), shape (spins, kpts, n2 - n1), at ``calc``'s k-points."""
        n1, n2 = self._band_range(calc, bands)
        sigma = self.corrections(calc, (n1, n2))
        ns, nk = sigma.shape[:2]
        eps = np.array([[calc.get_eigenvalues(kpt=k, spin=s)[n1:n2] for k in range(nk)]
                        for s in range(ns)])
        return eps + sigma

    def band_path_calculator(self, calc, path: str | BandPath = "GMKG", npoints: int = 80,
                             nbands: int | None = None):
        """Non-self-consistent GPAW run on a band path (density of ``calc``)."""
        atoms = calc.get_atoms()
        if not isinstance(path, BandPath):
            path = atoms.cell.bandpath(path, npoints=npoints, pbc=[True, True, False])
        nbands = nbands or _nocc(calc) + 8
        return non_scf(calc, path, nbands=nbands + 4, converge_bands=nbands), path

    def band_structure(self, calc, path: str | BandPath = "GMKG", npoints: int = 80,
                       bands: tuple[int, int] | None = None) -> BandStructure:
        """ASE BandStructure of quasiparticle energies along ``path`` (reference: DFT E_F)."""
        t0 = time.perf_counter()
        self.material_context(calc)
        n1, n2 = self._band_range(calc, bands)
        t1 = time.perf_counter()
        path_calc, bandpath = self.band_path_calculator(calc, path, npoints, nbands=n2 + 1)
        t2 = time.perf_counter()
        sigma = self.corrections(path_calc, (n1, n2), context_calc=calc)
        ns, nk = sigma.shape[:2]
        eps = np.array([[path_calc.get_eigenvalues(kpt=k, spin=s)[n1:n2] for k in range(nk)]
                        for s in range(ns)])
        self.timings.update(path_dft_s=t2 - t1, band_structure_s=time.perf_counter() - t0)
        self.last_dft_energies = eps
        return BandStructure(bandpath, eps + sigma, reference=calc.get_fermi_level())


class GWCalc(MLCalculator):
    """ASE calculator wrapping a DFT (GPAW) calculator: eigenvalues are GW-corrected.

    ``bands=(n1, n2)`` selects the corrected window (default: 4 below and 4 above the gap);
    ``get_eigenvalues`` returns only that window. Energies/forces pass through from ``dft``.
    """

    implemented_properties = ["energy", "free_energy"]
    model_class = GWModel
    default_model = "c2d-pbe"

    def __init__(self, dft, model: str | GWModel | None = None,
                 bands: tuple[int, int] | None = None, **kwargs):
        super().__init__(model=model, **kwargs)
        self.dft = dft
        self.bands = bands
        self.gw = GWCorrection(self.model)
        self._qp: np.ndarray | None = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms.copy()
        atoms.calc = self.dft
        self.results["energy"] = atoms.get_potential_energy()
        self.results["free_energy"] = self.results["energy"]

    def _energies(self) -> np.ndarray:
        if self._qp is None:
            self._qp = self.gw.quasiparticle_energies(self.dft, self.bands)
        return self._qp

    def get_eigenvalues(self, kpt: int = 0, spin: int = 0) -> np.ndarray:
        """Quasiparticle energies (eV) of the corrected band window at k-point ``kpt``."""
        return self._energies()[spin, kpt].copy()

    def get_number_of_bands(self) -> int:
        return int(self._energies().shape[2])

    def get_fermi_level(self) -> float:
        return float(self.dft.get_fermi_level())

    def get_ibz_k_points(self) -> np.ndarray:
        return np.asarray(self.dft.get_ibz_k_points())

    def get_k_point_weights(self) -> np.ndarray:
        return np.asarray(self.dft.get_k_point_weights())

    def get_number_of_spins(self) -> int:
        return int(self.dft.get_number_of_spins())

    def get_spin_polarized(self) -> bool:
        return self.get_number_of_spins() == 2

    def band_structure(self, path: str | BandPath = "GMKG", npoints: int = 80) -> BandStructure:
        """GW band structure along ``path`` (non-SCF DFT on the path + corrections)."""
        return self.gw.band_structure(self.dft, path, npoints, self.bands)


__all__ = ["GWCorrection", "GWCalc", "HeadNotTrainedError"]
