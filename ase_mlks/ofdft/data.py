"""The three OF-DFT testbeds of Costa, Scriva & Pilati: potentials, exact ground states, datasets.

Units: energies in E0 = hbar^2/(m a0^2) (the Hartree for an electron), lengths in a0 (Bohr);
the Hamiltonian is H = -1/2 nabla^2 + V and the density n = |psi_gs|^2 with sum(n) * dv = 1.

Grids
-----
* ``gauss1d``: hard-wall box [0, 1], 256 interior points x_i = i / 257 (i = 1..256); the
  walls x = 0 and x = 1 carry psi = 0 and the 9-point stencil reaches past them through the
  odd reflection psi(-x) = -psi(x), which is exact for the box eigenfunctions.
* ``speckle1d``: periodic box of length 14 with 256 points x_i = 14 i / 256, 11-point stencil.
* ``gauss3d``: periodic unit cube, 18 points per axis at x_i = i / 18, 11-point stencil per axis.

Datasets are generated in chunks from ``numpy.random.default_rng([seed, index])`` per
instance, so any subset is reproducible and a killed generation resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from tqdm.auto import tqdm

from ..core.io import atomic_path, read_array, write_array

SIGMA_3D = 1.0 / 6.0  # scatterer width in a0 (paper: sigma = L / 6)
N_GAUSS_3D = 10  # scatterers per 3D instance; also the 1/N prefactor of the potential
SPECKLE_V0 = 0.25  # mean speckle intensity in E0


def fd_second_derivative_coefficients(half_width: int) -> np.ndarray:
    """Central finite-difference coefficients c_0..c_m of d^2/dx^2 (order 2m), times dx^2.

    f''(x) ~ (c_0 f(x) + sum_k c_k (f(x + k dx) + f(x - k dx))) / dx^2.
    """
    m = half_width
    c = np.zeros(m + 1)
    for k in range(1, m + 1):
        c[k] = 2.0 * (-1) ** (k + 1) * math.factorial(m) ** 2 / (
            k**2 * math.factorial(m - k) * math.factorial(m + k))
    c[0] = -2.0 * c[1:].sum()
    return c


def laplacian_1d(n: int, dx: float, half_width: int, periodic: bool) -> sp.csr_matrix:
    """1D second-derivative matrix (n x n) in 1/a0^2; hard walls use odd reflection."""
    c = fd_second_derivative_coefficients(half_width)
    rows, cols, vals = [], [], []
    for i in range(n):
        for k in range(-half_width, half_width + 1):
            j = i + k
            coef = c[abs(k)]
            if periodic:
                j %= n
            elif j < 0:  # ghost point x_j = -x_{-j}: psi = -psi(x_{-j}); x_0 = wall (psi = 0)
                j, coef = -j - 2, -coef
                if j < 0:
                    continue
            elif j >= n:
                j, coef = 2 * n - j, -coef
                if j >= n:
                    continue
            rows.append(i)
            cols.append(j)
            vals.append(coef)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n)) / dx**2


@dataclass(frozen=True)
class Testbed:
    """One testbed: grid geometry, finite-difference order and potential sampler."""

    name: str
    shape: tuple[int, ...]
    length: float  # box edge in a0
    periodic: bool
    half_width: int  # stencil half width: 4 = 9-point, 5 = 11-point
    sampler: Callable[[np.random.Generator], np.ndarray] = field(repr=False, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dx(self) -> float:
        """Grid spacing in a0."""
        npts = self.shape[0]
        return self.length / npts if self.periodic else self.length / (npts + 1)

    @property
    def dv(self) -> float:
        """Volume element (a0^ndim) of the sum rule int f = dv * sum f."""
        return self.dx**self.ndim

    def coordinates(self) -> np.ndarray:
        """1D grid coordinates along one axis (a0)."""
        i = np.arange(self.shape[0])
        return i * self.dx if self.periodic else (i + 1) * self.dx

    def kinetic(self) -> sp.csr_matrix:
        """Sparse kinetic-energy matrix -1/2 nabla^2 (E0) on the flattened grid (C order)."""
        d = laplacian_1d(self.shape[0], self.dx, self.half_width, self.periodic)
        if self.ndim == 1:
            lap = d
        else:
            eye = sp.identity(self.shape[0], format="csr")
            lap = (sp.kron(sp.kron(d, eye), eye) + sp.kron(sp.kron(eye, d), eye)
                   + sp.kron(sp.kron(eye, eye), d))
        return (-0.5 * lap).tocsr()

    def sample(self, seed: int, index: int) -> np.ndarray:
        """Potential of instance ``index`` of the dataset with ``seed`` (E0, grid shape)."""
        return self.sampler(self, np.random.default_rng([seed, index]))


def gauss1d_potential(tb: Testbed, rng: np.random.Generator) -> np.ndarray:
    """Three Gaussian bumps: a in U[1,10] E0, b in U[0.4,0.6] a0, c in U[0.03,0.1] a0."""
    a = rng.uniform(1.0, 10.0, 3)
    b = rng.uniform(0.4, 0.6, 3)
    c = rng.uniform(0.03, 0.1, 3)
    x = tb.coordinates()
    return np.sum(a[:, None] * np.exp(-((x[None] - b[:, None]) ** 2) / (2 * c[:, None] ** 2)), 0)


def speckle1d_potential(tb: Testbed, rng: np.random.Generator, v0: float = SPECKLE_V0,
                        correlation_length: float = 1.0) -> np.ndarray:
    """Speckle intensity: |filtered complex Gaussian field|^2, mean v0, P(V) = exp(-V/v0)/v0.

    A circular aperture |k| <= pi / correlation_length in Fourier space gives the field
    correlation sin(k_c x)/(k_c x), hence the intensity autocorrelation sinc^2(pi x / l_c).
    """
    n = tb.shape[0]
    field_ = rng.normal(size=n) + 1j * rng.normal(size=n)  # <|xi|^2> = 2
    k = 2 * np.pi * np.fft.fftfreq(n, d=tb.dx)
    keep = np.abs(k) <= np.pi / correlation_length + 1e-12
    filtered = np.fft.ifft(np.fft.fft(field_) * keep)
    # <|filtered|^2> = 2 * (kept modes) / n for unit-variance components: divide it out
    expected = 2.0 * keep.sum() / n
    return v0 * np.abs(filtered) ** 2 / expected


def gauss3d_components(centres: np.ndarray, coords: np.ndarray, length: float = 1.0,
                       sigma: float = SIGMA_3D) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis Gaussian factors and minimum-image offsets.

    centres: (..., 3) in a0; coords: (n,) grid coordinates.  Returns g (..., 3, n), the
    factor exp(-d^2 / 2 sigma^2), and d (..., 3, n), the minimum-image offset r - centre.
    """
    d = coords - centres[..., None]
    d = d - length * np.round(d / length)
    return np.exp(-(d**2) / (2 * sigma**2)), d


def gauss3d_from_params(amplitudes: np.ndarray, centres: np.ndarray, coords: np.ndarray,
                        length: float = 1.0, sigma: float = SIGMA_3D) -> np.ndarray:
    """V(r) = 1/10 sum_i A_i (2 pi)^-3/2 sigma^-3 exp(-|dr_i|^2 / 2 sigma^2) on the grid (E0).

    amplitudes (M,), centres (M, 3) in a0; the Gaussian is separable, so the grid sum is
    an einsum of per-axis factors.
    """
    g, _ = gauss3d_components(np.asarray(centres, float), coords, length, sigma)
    pref = np.asarray(amplitudes, float) / (N_GAUSS_3D * (2 * np.pi) ** 1.5 * sigma**3)
    return np.einsum("i,ix,iy,iz->xyz", pref, g[:, 0], g[:, 1], g[:, 2])


def gauss3d_potential(tb: Testbed, rng: np.random.Generator) -> np.ndarray:
    """Ten Gaussian scatterers, A_i in U[0, 2], centres uniform in the cube."""
    amplitudes = rng.uniform(0.0, 2.0, N_GAUSS_3D)
    centres = rng.uniform(0.0, tb.length, (N_GAUSS_3D, 3))
    return gauss3d_from_params(amplitudes, centres, tb.coordinates(), tb.length)


TESTBEDS: dict[str, Testbed] = {
    "gauss1d": Testbed("gauss1d", (256,), 1.0, False, 4, gauss1d_potential),
    "speckle1d": Testbed("speckle1d", (256,), 14.0, True, 5, speckle1d_potential),
    "gauss3d": Testbed("gauss3d", (18, 18, 18), 1.0, True, 5, gauss3d_potential),
}


def get_testbed(name: str) -> Testbed:
    """Testbed by name ('gauss1d', 'speckle1d', 'gauss3d')."""
    try:
        return TESTBEDS[name]
    except KeyError:
        raise ValueError(f"unknown OF-DFT testbed {name!r}; known: {sorted(TESTBEDS)}") from None


def cubic_testbed(npts: int) -> Testbed:
    """The 3D Gaussian testbed on another grid (npts^3), for scaling studies."""
    return Testbed(f"gauss3d-{npts}", (npts,) * 3, 1.0, True, 5, gauss3d_potential)


# ---------------------------------------------------------------------------------------
# exact diagonalization
# ---------------------------------------------------------------------------------------
_KINETIC_CACHE: dict[Testbed, sp.csr_matrix] = {}


def _kinetic(tb: Testbed) -> sp.csr_matrix:
    if tb not in _KINETIC_CACHE:
        _KINETIC_CACHE[tb] = tb.kinetic()
    return _KINETIC_CACHE[tb]


def ground_state(tb: Testbed, potential: np.ndarray, tol: float = 1e-12
                 ) -> tuple[float, np.ndarray]:
    """Exact ground state on the grid: (e_gs in E0, density n with dv * sum(n) = 1).

    1D hard walls: banded symmetric eigensolver; 1D periodic: dense LAPACK (lowest
    eigenpair only); 3D: sparse Lanczos (ARPACK eigsh, smallest algebraic), started from the
    nodeless uniform vector.
    """
    v = np.asarray(potential, float)
    if v.shape != tb.shape:
        raise ValueError(f"potential has shape {v.shape}, testbed {tb.name} needs {tb.shape}")
    h = _kinetic(tb) + sp.diags(v.ravel())
    if tb.ndim == 1 and not tb.periodic:
        bw = tb.half_width
        band = np.zeros((bw + 1, h.shape[0]))
        hd = h.toarray()
        for k in range(bw + 1):
            band[k, : h.shape[0] - k] = np.diagonal(hd, -k)
        w, vec = sla.eig_banded(band, lower=True, select="i", select_range=(0, 0))
    elif tb.ndim == 1:
        w, vec = sla.eigh(h.toarray(), subset_by_index=[0, 0])
    else:
        w, vec = spla.eigsh(h, k=1, which="SA", tol=tol, v0=np.ones(h.shape[0]))
    psi2 = vec[:, 0] ** 2
    density = (psi2 / (psi2.sum() * tb.dv)).reshape(tb.shape)
    return float(w[0]), density


def exact_functional(tb: Testbed, density: np.ndarray) -> float:
    """F[n] = <sqrt(n)| T |sqrt(n)> (E0): the exact single-particle functional on the grid.

    For one nodeless orbital F = T_vW exactly; used to validate data, not by the models.
    """
    psi = np.sqrt(np.clip(np.asarray(density, float).ravel(), 0, None) * tb.dv)
    return float(psi @ (_kinetic(tb) @ psi))


# ---------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------
def _solve_chunk(args: tuple[str, int, int, int]) -> dict[str, np.ndarray]:
    name, seed, start, stop = args
    tb = get_testbed(name)
    pots, dens, eng = [], [], []
    for i in range(start, stop):
        v = tb.sample(seed, i)
        e, n = ground_state(tb, v)
        pots.append(v)
        dens.append(n)
        eng.append(e)
    pots_a, dens_a = np.stack(pots), np.stack(dens)
    e_a = np.array(eng)
    f = e_a - (pots_a * dens_a).reshape(len(eng), -1).sum(1) * tb.dv
    return {"potential": pots_a, "density": dens_a, "energy": e_a, "functional": f,
            "index": np.arange(start, stop)}


def generate_dataset(name: str, directory: str | Path, n: int, seed: int = 0,
                     chunk: int = 250, workers: int = 1, progress: bool = True) -> Path:
    """Generate (or resume) ``n`` instances of testbed ``name`` into ``directory``.

    Each chunk of ``chunk`` instances is one HDF5 file ``part-<start>.h5`` (float32,
    gzip) written atomically; existing chunks are skipped, so a killed run resumes.
    ``workers`` > 1 solves chunks in parallel processes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    todo = [(name, seed, s, min(s + chunk, n)) for s in range(0, n, chunk)
            if not (directory / f"part-{s:07d}.h5").exists()]
    bar = tqdm(total=n, initial=n - sum(b - a for _, _, a, b in todo), desc=f"{name} data",
               disable=not progress)

    def _write(args, arrays):
        path = directory / f"part-{args[2]:07d}.h5"
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            h5.attrs.update(testbed=name, seed=seed, start=args[2], stop=args[3])
            for key, val in arrays.items():
                dtype = np.float64 if key in ("energy", "functional") else np.float32
                write_array(h5, key, val, dtype=dtype)
        bar.update(args[3] - args[2])

    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for args, arrays in zip(todo, pool.map(_solve_chunk, todo)):
                _write(args, arrays)
    else:
        for args in todo:
            _write(args, _solve_chunk(args))
    bar.close()
    return directory


def load_dataset(directory: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """Concatenate the chunks of a generated dataset (in index order).

    Returns potential (N, *shape) float32, density (N, *shape) float32, energy (N,)
    float64, functional (N,) float64 and index (N,).
    """
    parts = sorted(Path(directory).glob("part-*.h5"))
    if not parts:
        raise FileNotFoundError(f"no dataset chunks (part-*.h5) in {directory}")
    out: dict[str, list[np.ndarray]] = {}
    for p in parts:
        with h5py.File(p, "r") as h5:
            for key in ("potential", "density", "energy", "functional", "index"):
                out.setdefault(key, []).append(read_array(h5, key))
    data = {k: np.concatenate(v) for k, v in out.items()}
    if limit is not None:
        data = {k: v[:limit] for k, v in data.items()}
    return data
