"""ASE calculator bases: model loading and caching (``MLCalculator``) and the electronic-structure
API of Hamiltonian-producing models (``HamiltonianCalculator``).

``HamiltonianCalculator`` gives any model that can build a ``TBHamiltonian`` the methods users
know from GPAW: ``get_eigenvalues(kpt, spin)``, ``get_fermi_level()``,
``get_ibz_k_points()``, ``get_k_point_weights()``, ``get_number_of_spins()``,
``get_number_of_bands()``, ``band_structure()`` (an ASE ``BandStructure`` built straight from
the ``BandPath``, so nothing is guessed back) and ``get_dos()``.

k-points come from the ``kpts`` parameter: a Monkhorst–Pack size ``(n1, n2, n3)`` (Γ-centred,
reduced by symmetry to the irreducible wedge), a dict ``{"size": ..., "symmetry": False}``, a
``BandPath``, or an explicit (nk, 3) array of fractional k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.dft.kpoints import BandPath
from ase.spectrum.band_structure import BandStructure

from .checkpoint import CheckpointMixin
from .electrons import density_of_states, fermi_level
from .errors import AseMlksError, StructureError
from .hamiltonian import DENSE_LIMIT, TBHamiltonian, monkhorst_pack_gamma
from .symmetry import irreducible_kpoints

K_PARAMETERS = {"kpts", "nbands", "sigma", "width"}
LARGE_CELL_NBANDS = 20  # bands nearest the Fermi level in large-cell band structures


class MLCalculator(Calculator):
    """Base of every ase_mlks calculator: resolves ``model`` (shipped name, path or instance).

    Subclasses set ``model_class`` (a ``CheckpointMixin`` torch module) and
    ``default_model``, implement ``calculate`` the ASE way, and may extend ``check_atoms``.
    """

    model_class: type[CheckpointMixin] | None = None
    default_model: str | None = None

    def __init__(self, model: str | torch.nn.Module | None = None, device: str = "cpu",
                 **kwargs):
        super().__init__(**kwargs)
        self.implemented_properties = list(type(self).implemented_properties)
        self.device = torch.device(device)
        self.model = self._resolve_model(model)

    def _resolve_model(self, model):
        if model is None:
            model = self.default_model
        if model is None and self.model_class is None:
            return None  # an analytic calculator with nothing to load
        if model is None:
            raise AseMlksError(f"{type(self).__name__} needs a model (name, path or instance)")
        if isinstance(model, torch.nn.Module):
            return model.to(self.device).eval()
        if self.model_class is None:
            raise AseMlksError(f"{type(self).__name__} cannot load models by name")
        return self.model_class.load(model, map_location=self.device).eval()

    def check_atoms(self, atoms: Atoms) -> None:
        """Raise a clear error for structures the model cannot handle (override to extend)."""
        if len(atoms) == 0:
            raise StructureError("the structure has no atoms")

    def calculate(self, atoms: Atoms | None = None, properties=("energy",),
                  system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self.check_atoms(self.atoms)


class HamiltonianCalculator(MLCalculator):
    """Base for models that produce a tight-binding/atomic-orbital Hamiltonian.

    Subclasses implement ``build_hamiltonian(atoms) -> TBHamiltonian``.
    """

    default_parameters: dict[str, Any] = {"kpts": (1, 1, 1), "nbands": None, "sigma": None,
                                          "width": 0.05}

    def __init__(self, *args, **kwargs):
        self._electronic: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    # -- model hook -----------------------------------------------------------------------
    def build_hamiltonian(self, atoms: Atoms) -> TBHamiltonian:
        raise NotImplementedError

    # -- caching ----------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._electronic = {}

    def set(self, **kwargs):
        # k-point settings change the spectrum, not H(R): keep the Hamiltonian.
        keep = self._electronic.get("hamiltonian")
        changed = super().set(**kwargs)
        if keep is not None and changed and set(changed) <= K_PARAMETERS:
            self._electronic = {"hamiltonian": keep}
        return changed

    def set_atoms(self, atoms: Atoms) -> None:
        """Called by ASE on ``atoms.calc = calc``: later queries follow those atoms."""
        self._attached = atoms

    def _current_atoms(self, atoms: Atoms | None) -> Atoms:
        if atoms is None:
            atoms = getattr(self, "_attached", None)
        if atoms is None:
            if self.atoms is None:
                raise AseMlksError("no structure: attach the calculator to atoms first")
            return self.atoms
        if self.check_state(atoms):
            self.reset()
        return atoms

    def get_hamiltonian(self, atoms: Atoms | None = None) -> TBHamiltonian:
        """The model's real-space Hamiltonian for ``atoms`` (cached until atoms change)."""
        atoms = self._current_atoms(atoms)
        if "hamiltonian" not in self._electronic:
            self.check_atoms(atoms)
            if self.atoms is None or self.check_state(atoms):
                self.atoms = atoms.copy()
            self._electronic["hamiltonian"] = self.build_hamiltonian(self.atoms)
        return self._electronic["hamiltonian"]

    # -- k-points ---------------------------------------------------------------------------
    def _kpoints(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        kpts = self.parameters.get("kpts", (1, 1, 1))
        if isinstance(kpts, BandPath):
            k = kpts.kpts
            return k, np.full(len(k), 1.0 / len(k))
        if isinstance(kpts, dict):
            size, symmetric = kpts.get("size", (1, 1, 1)), kpts.get("symmetry", True)
        else:
            arr = np.asarray(kpts, dtype=float)
            if arr.ndim == 2:
                return arr, np.full(len(arr), 1.0 / len(arr))
            size, symmetric = arr.astype(int), True
        size = np.where(atoms.pbc, size, 1)
        if symmetric and atoms.pbc.any():
            return irreducible_kpoints(atoms, size)
        k = monkhorst_pack_gamma(size)
        return k, np.full(len(k), 1.0 / len(k))

    def _spectrum(self) -> dict[str, np.ndarray]:
        ham = self.get_hamiltonian()
        if "eigenvalues" not in self._electronic:
            k, w = self._kpoints(self.atoms)
            p = self.parameters
            sigma = p.get("sigma")
            nbands = p.get("nbands")
            if nbands is not None and sigma is None and ham.norb > 3000:
                sigma = self.get_fermi_level()
            eps = ham.eigenvalues(k, nbands=nbands, sigma=sigma)
            self._electronic.update(kpts=k, weights=w, eigenvalues=eps)
        return self._electronic

    # -- the GPAW-like API ----------------------------------------------------------------
    def get_ibz_k_points(self) -> np.ndarray:
        """Fractional k-points (nk, 3) of the current ``kpts`` setting."""
        return self._spectrum()["kpts"].copy()

    def get_k_point_weights(self) -> np.ndarray:
        return self._spectrum()["weights"].copy()

    def get_number_of_spins(self) -> int:
        return 1

    def get_spin_polarized(self) -> bool:
        return False

    def get_number_of_bands(self) -> int:
        return int(self._spectrum()["eigenvalues"].shape[1])

    def get_eigenvalues(self, kpt: int = 0, spin: int = 0) -> np.ndarray:
        """Band energies (eV) at k-point index ``kpt``."""
        if spin != 0:
            raise IndexError("spin-unpolarized calculator: only spin=0 exists")
        return self._spectrum()["eigenvalues"][kpt].copy()

    def get_fermi_level(self) -> float:
        """Fermi level (eV) from the electron count with Fermi–Dirac smearing ``width``.

        Needs all bands: computed on the ``kpts`` mesh (or a 6x6 mesh of the periodic
        directions when ``kpts`` is a band path) with the dense solver. Cells above
        ``DENSE_LIMIT`` orbitals (moiré supercells, insulators): the middle of the Γ-point
        gap, :func:`gamma_midgap` — one partial diagonalization instead of a k-mesh of full ones.
        """
        if "fermi_level" not in self._electronic:
            ham = self.get_hamiltonian()
            if ham.nelectrons is None:
                raise AseMlksError("the model's Hamiltonian does not state its electron count")
            if ham.norb > DENSE_LIMIT:
                self._electronic["fermi_level"] = gamma_midgap(ham)
                return self._electronic["fermi_level"]
            kpts = self.parameters.get("kpts")
            if isinstance(kpts, BandPath) or np.asarray(kpts).ndim == 2:
                k = monkhorst_pack_gamma(np.where(self.atoms.pbc, 6, 1))
                w = None
            else:
                k, w = self._kpoints(self.atoms)
            eps = ham.eigenvalues(k)
            self._electronic["fermi_level"] = fermi_level(eps, w, ham.nelectrons,
                                                          self.parameters.get("width", 0.05))
        return self._electronic["fermi_level"]

    def band_structure(self, path: BandPath | str | None = None, npoints: int = 100,
                       nbands: int | None = None, sigma: float | None = None,
                       reference: float | None = None, workers: int = 1) -> BandStructure:
        """Band structure along ``path`` (a ``BandPath``, or a special-point string such as
        'GMKG' for ``atoms.cell.bandpath``); defaults to the ``kpts`` parameter if that is a
        path. With ``nbands`` only the bands nearest ``sigma`` (default: Fermi level) are
        computed, by a shift-invert solver for large cells (above ``DENSE_LIMIT`` orbitals
        ``nbands`` defaults to ``LARGE_CELL_NBANDS``). Energies in eV on the model's absolute
        scale; ``reference`` (default Fermi level) is what ``plot`` puts at zero.
        ``workers`` > 1 splits a large cell's path over that many processes (one per core).
        """
        ham = self.get_hamiltonian()
        if path is None:
            path = self.parameters.get("kpts")
            if not isinstance(path, BandPath):
                raise AseMlksError("give a path, or set kpts to a BandPath first")
        elif isinstance(path, str):
            path = self.atoms.cell.bandpath(path, npoints=npoints, pbc=self.atoms.pbc)
        if reference is None:
            reference = self.get_fermi_level() if ham.nelectrons is not None else 0.0
        if nbands is None and ham.norb > DENSE_LIMIT:
            nbands = LARGE_CELL_NBANDS
        if nbands is not None and sigma is None:
            sigma = reference
        eps = ham.eigenvalues(path.kpts, nbands=nbands, sigma=sigma, workers=workers)
        return BandStructure(path=path, energies=eps[None], reference=reference)

    def get_dos(self, energies: np.ndarray | None = None, width: float = 0.1,
                npts: int = 601) -> tuple[np.ndarray, np.ndarray]:
        """(energies, DOS in states/eV per cell) from the ``kpts`` mesh, Gaussian broadening."""
        s = self._spectrum()
        eps = s["eigenvalues"]
        if energies is None:
            energies = np.linspace(eps.min() - 5 * width, eps.max() + 5 * width, npts)
        return energies, density_of_states(eps, s["weights"], energies, width)

    def get_homo_lumo(self) -> tuple[float, float]:
        """Highest occupied and lowest unoccupied levels (eV), for molecules and insulators."""
        ham = self.get_hamiltonian()
        if ham.nelectrons is None:
            raise AseMlksError("the model's Hamiltonian does not state its electron count")
        eps = self._spectrum()["eigenvalues"]
        nocc = int(round(ham.nelectrons)) // 2
        return float(eps[:, nocc - 1].max()), float(eps[:, nocc].min())


def gamma_midgap(ham: TBHamiltonian) -> float:
    """Middle (eV) between the highest occupied and lowest empty Γ-point levels.

    Only the two levels are computed (LAPACK ``evr`` on the subset): for a real H(R), H(Γ)
    is real symmetric, which halves the work again.
    """
    hk = ham.hk(np.zeros(3))
    if ham.s is None and np.abs(hk.imag).max() < 1e-12:
        hk = hk.real
    nocc = int(round(ham.nelectrons / 2))
    if not 0 < nocc < ham.norb:
        raise AseMlksError(f"{ham.nelectrons} electrons in {ham.norb} orbitals: no gap")
    s = None if ham.s is None else ham.sk(np.zeros(3))
    e = scipy.linalg.eigh(hk, s, eigvals_only=True, subset_by_index=[nocc - 1, nocc],
                          driver="evr" if s is None else "gvx")
    return float(0.5 * (e[0] + e[1]))
