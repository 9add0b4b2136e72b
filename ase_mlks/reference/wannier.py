"""Wannier-type tight-binding Hamiltonians H(R) from GPAW LCAO calculations.

Construction (the DPWannier paper's alternative to maximal localization: Wannierized atomic
orbitals, optionally followed by a fixed number of localization steps, localize.py):

1. Bloch states psi_nk of a converged LCAO calculation on a full Gamma-centred k-grid
   (time-reversal partners rebuilt as complex conjugates).
2. Projection on chosen atomic orbitals g_a (the single-zeta functions of GPAW's basis,
   e.g. Mo 4d + S 3p): A_na(k) = <psi_nk | g_ak> = sum_M C*_nM S_Ma.
3. Band selection per k: the ``norb`` bands with the largest projection weight
   (``selection='weight'``; exact for an isolated manifold such as MoS2's 11 d/p bands), or
   every band inside an energy window (``selection=(emin, emax)``, eV vs vacuum;
   projected-Wannier disentanglement when the window holds more bands than orbitals).
4. Löwdin orthonormalization U = A (A^dag A)^(-1/2) (polar factor, via SVD), so
   w_ak = sum_n psi_nk U_na is orthonormal and as close as possible to the atomic
   orbitals: the basis changes smoothly with the structure.
   Optional (``localization_steps`` > 0): that many steepest-descent steps on the
   Marzari–Vanderbilt spread, rotating the gauge inside the selected subspace (localize.py).
5. H_W(k) = U^dag diag(e_k) U, Fourier transformed to H(R) = 1/N sum_k e^{-2 pi i k.R} H_W(k)
   with Wigner-Seitz images: every element (a, b, R mod N) is given to the lattice vector(s)
   R minimising |tau_b + R - tau_a| in the Born-von-Karman supercell (shared equally when
   several are equally close), which is what makes the interpolation accurate between the
   k-points of the grid.

The result follows the core convention H_ab(R) = <a, 0 | H | b, R>,
H_ab(k) = sum_R e^{2 pi i k.R} H_ab(R) (see ase_mlks/core/hamiltonian.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from ase.units import Ha

from ..core.errors import UnknownElementError
from ..core.hamiltonian import TBHamiltonian
from ..core.orbitals import OrbitalBasis

__all__ = [
    "MOS2_BASIS",
    "TMD_BASIS",
    "BlochData",
    "WannierResult",
    "bloch_data",
    "build_wannier",
    "projection_indices",
    "wannier_hk",
    "fourier_ws",
    "band_error",
    "compare_bands",
    "gpaw_manifold_bands",
]

# Mo/W 4d/5d + chalcogen p: 11 orbitals per MX2 formula unit
TMD_BASIS = {"Mo": "4d", "W": "5d", "Cr": "3d", "S": "3p", "Se": "4p", "Te": "5p",
             "B": "2p", "N": "2p", "C": "2p"}
MOS2_BASIS = OrbitalBasis({"Mo": "4d", "S": "3p"})


@dataclass
class BlochData:
    """LCAO Bloch states on the full k-grid.

    kpts: (nk, 3) fractional; eigenvalues: (nk, nb) eV; C: (nk, nb, nM) coefficients,
    psi_n = sum_M C[n, M] Phi_M; S: (nk, nM, nM) AO overlaps <Phi_M | Phi_M'>.
    """

    kpts: np.ndarray
    eigenvalues: np.ndarray
    C: np.ndarray
    S: np.ndarray
    grid: tuple[int, int, int]


@dataclass
class WannierResult:
    """Wannier Hamiltonian H(R) and what it took to make it.

    R: (nR, 3) int; H: (nR, norb, norb) complex (eV, vs vacuum); orbital_atoms: (norb,);
    orbital_positions: (norb, 3) Å; nelectrons: electrons in the manifold (from the GPAW
    occupations); min_singular: smallest singular value of the projection matrix over k
    (near 0 means the orbitals do not span the selected bands); labels: orbital labels;
    localization: steps, step and the spread (Å^2) before and after them, or None.
    """

    R: np.ndarray
    H: np.ndarray
    cell: np.ndarray
    orbital_atoms: np.ndarray
    orbital_positions: np.ndarray
    labels: list[str]
    nelectrons: float
    min_singular: float
    grid: tuple[int, int, int]
    selection: str
    localization: dict | None = None

    def tb(self) -> TBHamiltonian:
        """The core TBHamiltonian (real H(R): the orbitals are real functions)."""
        H = self.H
        if np.abs(H.imag).max() < 1e-6 * max(1.0, np.abs(H).max()):
            H = H.real
        ham = TBHamiltonian.from_dense(self.cell, self.R, H, orbital_atoms=self.orbital_atoms,
                                       nelectrons=self.nelectrons, pbc=(True, True, False),
                                       labels=self.labels)
        return ham

    def eigenvalues(self, kpts) -> np.ndarray:
        """Band energies (nk, norb) in eV at fractional kpts."""
        kpts = np.atleast_2d(kpts)
        phase = np.exp(2j * np.pi * kpts @ self.R.T)  # (nk, nR)
        hk = np.einsum("kr,rab->kab", phase, self.H)
        hk = 0.5 * (hk + hk.conj().transpose(0, 2, 1))
        return np.linalg.eigvalsh(hk)


# ---------------------------------------------------------------------------------------
# GPAW access

def _setup_shell_functions(setup) -> list[tuple[str, int, int]]:
    """(name, l, offset) of every radial basis function of a GPAW setup, in M order."""
    out, offset = [], 0
    for bf in setup.basis.bf_j:
        out.append((str(bf.type), int(bf.l), offset))
        offset += 2 * bf.l + 1
    return out


def projection_indices(setups, numbers, basis: OrbitalBasis | dict):
    """Indices M of the projection orbitals in GPAW's LCAO basis, with atoms and labels.

    For every atom and every shell of ``basis`` (e.g. '4d') the single-zeta function of
    that shell ('4d-sz ...') is used. Raises UnknownElementError for an element that the
    projection does not cover or whose GPAW basis lacks the shell.
    """
    if not isinstance(basis, OrbitalBasis):
        basis = OrbitalBasis(basis)
    idx, atoms_of, labels = [], [], []
    offset = 0
    for a, (z, setup) in enumerate(zip(numbers, setups)):
        if z not in basis.shells:
            hint = TMD_BASIS.get(setup.symbol, "2p")
            raise UnknownElementError(
                f"element {setup.symbol} (atom {a}) has no orbitals in the Wannier projection "
                f"{basis.to_dict()}; add it, e.g. {{'{setup.symbol}': '{hint}'}}")
        funcs = _setup_shell_functions(setup)
        for shell in basis.shells[z]:
            name = shell.name
            match = [f for f in funcs if f[1] == shell.l and f[0].startswith(f"{name}-sz")]
            if not match:  # shell given without principal number: first sz of that l
                match = [f for f in funcs if f[1] == shell.l and "-sz" in f[0]
                         and (shell.n == 0)]
            if not match:
                have = ", ".join(f[0] for f in funcs)
                raise UnknownElementError(
                    f"GPAW basis of {setup.symbol} has no single-zeta {name} function "
                    f"(it has: {have})")
            _, l, off = match[0]
            for m in range(2 * l + 1):
                idx.append(offset + off + m)
                atoms_of.append(a)
                labels.append(f"{setup.symbol}{a}:{name}:{m - l}")
        offset += setup.nao
    return np.array(idx), np.array(atoms_of), labels


def bloch_data(calc) -> BlochData:
    """Collect LCAO coefficients, overlaps and eigenvalues of a (new-)GPAW LCAO calculation.

    The calculation must use a Gamma-centred grid without point-group symmetry; k-points
    removed by time reversal are rebuilt as complex conjugates.
    """
    dft = calc.dft
    ibz = dft.ibzwfs
    kpts, eigs, Cs, Ss = [], [], [], []
    for wfs in ibz:
        if wfs.spin != 0:
            raise NotImplementedError("spin-polarized Wannier construction")
        k = np.asarray(wfs.kpt_c, float)
        C = np.asarray(wfs.C_nM.data)
        S = np.asarray(wfs.S_MM.data)
        e = np.asarray(wfs.eig_n) * Ha
        kpts.append(k)
        eigs.append(e)
        Cs.append(C)
        Ss.append(S)
    bz = calc.get_bz_k_points()
    grid = _grid_of(bz)
    full = complete_by_time_reversal(kpts, grid)
    return BlochData(np.array([k for k, _, _ in full]),
                     np.array([eigs[i] for _, i, _ in full]),
                     np.array([Cs[i].conj() if c else Cs[i] for _, i, c in full]),
                     np.array([Ss[i].conj() if c else Ss[i] for _, i, c in full]), grid)


def complete_by_time_reversal(kpts, grid) -> list[tuple[np.ndarray, int, bool]]:
    """The full Γ-centred ``grid`` from irreducible ``kpts`` using X(-k) = conj(X(k)).

    Returns (k, index into ``kpts``, conjugate?) for every grid point: the given points
    first, then each missing -k. RuntimeError if point-group symmetry left gaps.
    """
    full = [(np.asarray(k), i, False) for i, k in enumerate(kpts)]
    have = {_key(k, grid) for k in kpts}
    for i, k in enumerate(kpts):
        mk = _fold(-np.asarray(k))
        if _key(mk, grid) not in have:
            have.add(_key(mk, grid))
            full.append((mk, i, True))
    if len(full) != int(np.prod(grid)):
        raise RuntimeError(f"k-grid {grid} incomplete after time reversal: {len(full)} "
                           "points; use a Gamma-centred grid without point-group symmetry")
    return full


def _fold(k):
    k = np.asarray(k, float)
    return k - np.round(k)


def _key(k, grid):
    return tuple(int(round(x * n)) % n for x, n in zip(k, grid))


def _grid_of(bz) -> tuple[int, int, int]:
    grid = []
    for c in range(3):
        vals = np.unique(np.round(_fold(bz[:, c]), 8))
        grid.append(len(vals))
    return tuple(grid)


# ---------------------------------------------------------------------------------------
# construction

def _hermitian(S: np.ndarray) -> np.ndarray:
    """GPAW may fill only one triangle of S_MM; rebuild the full Hermitian matrix."""
    if np.allclose(S, S.conj().T, atol=1e-10):
        return S
    lower = np.tril(S)
    return lower + np.tril(S, -1).conj().T


def select_bands(eigs: np.ndarray, weights: np.ndarray, norb: int, selection) -> np.ndarray:
    """Indices of the bands used at one k-point (sorted)."""
    if isinstance(selection, str) and selection == "weight":
        return np.sort(np.argsort(-weights)[:norb])
    if isinstance(selection, tuple | list) and len(selection) == 2:
        emin, emax = selection
        sel = np.nonzero((eigs >= emin) & (eigs <= emax))[0]
        if len(sel) < norb:
            raise ValueError(f"energy window {selection} holds {len(sel)} bands at some k, "
                             f"fewer than the {norb} orbitals")
        return sel
    if isinstance(selection, dict):
        omin, omax = selection["outer"]
        return np.nonzero((eigs >= omin) & (eigs <= omax))[0]
    raise ValueError("selection must be 'weight', (emin, emax) or "
                     f"{{'frozen': (fmin, fmax), 'outer': (omin, omax)}}, got {selection!r}")


def _disentangled_subspace(e: np.ndarray, A: np.ndarray, frozen: np.ndarray, norb: int):
    """Orthonormal norb-dimensional subspace of the outer-window bands (columns V).

    All frozen bands are kept; the rest is filled with the combinations of non-frozen
    bands that carry the most projection on the orbitals (the top left singular vectors of
    their projection matrix: the k-local initial step of Souza-Marzari-Vanderbilt).
    """
    nF = int(frozen.sum())
    if nF > norb:
        raise ValueError(f"frozen window holds {nF} bands at some k, more than the {norb} "
                         "orbitals; lower its upper edge")
    nO = len(e)
    V = np.zeros((nO, norb), complex)
    V[np.nonzero(frozen)[0], np.arange(nF)] = 1.0
    rest = np.nonzero(~frozen)[0]
    if norb > nF:
        if len(rest) < norb - nF:
            raise ValueError(f"outer window holds {nO} bands at some k, fewer than the "
                             f"{norb} orbitals; raise its upper edge")
        Wq, _, _ = np.linalg.svd(A[rest], full_matrices=False)
        V[rest, nF:] = Wq[:, : norb - nF]
    return V


def wannier_gauge(data: BlochData, proj: np.ndarray, selection="weight"):
    """Selected bands and Löwdin gauge per k-point.

    Returns (selected, T, smin): ``selected[q]`` band indices at k-point q, ``T[q]``
    (nsel, norb) coefficients of the Wannier-gauge Bloch orbitals
    |w_a k> = sum_n |psi_nk> T[q][n, a] (orthonormal columns), and the smallest singular
    value of the projection matrices.
    """
    norb = len(proj)
    selected, gauges, smin = [], [], np.inf
    for q in range(len(data.kpts)):
        S = _hermitian(data.S[q])
        C = data.C[q]
        A = C.conj() @ S[:, proj]  # (nb, norb): <psi_n | g_a>
        Sgg = S[np.ix_(proj, proj)]
        # weight of band n in span{g}: A Sgg^-1 A^dag (diagonal)
        w = np.einsum("na,ab,nb->n", A, np.linalg.inv(Sgg), A.conj()).real
        sel = select_bands(data.eigenvalues[q], w, norb, selection)
        e = data.eigenvalues[q][sel]
        Asel = A[sel]
        V = None
        if isinstance(selection, dict):  # frozen + outer window: disentangle first
            fmin, fmax = selection["frozen"]
            V = _disentangled_subspace(e, Asel, (e >= fmin) & (e <= fmax), norb)
            Asel = V.conj().T @ Asel
        W, sv, Vh = np.linalg.svd(Asel, full_matrices=False)
        smin = min(smin, sv.min())
        U = W @ Vh  # Löwdin/polar factor
        selected.append(sel)
        gauges.append(U if V is None else V @ U)
    return selected, gauges, float(smin)


def gauge_hamiltonian(data: BlochData, selected, gauges) -> np.ndarray:
    """H_W(k) = T^dag diag(e_k) T for every k-point, (nk, norb, norb) complex, eV."""
    return np.array([T.conj().T @ (data.eigenvalues[q][sel][:, None] * T)
                     for q, (sel, T) in enumerate(zip(selected, gauges))])


def wannier_hk(data: BlochData, proj: np.ndarray, selection="weight"):
    """H_W(k) (nk, norb, norb), selected bands per k, and min singular value of A."""
    selected, gauges, smin = wannier_gauge(data, proj, selection)
    return gauge_hamiltonian(data, selected, gauges), selected, smin


def fourier_ws(kpts: np.ndarray, Hk: np.ndarray, grid, cell: np.ndarray,
               positions: np.ndarray, tol: float = 1e-4):
    """H(R) from H(k) on a uniform grid, each element put on its Wigner-Seitz image(s).

    kpts: (nk, 3) fractional on the grid; Hk: (nk, norb, norb); positions: (norb, 3) Å
    orbital centres. Returns R (nR, 3) int and H (nR, norb, norb) complex.
    """
    grid = np.asarray(grid, int)
    nk = len(kpts)
    R0 = np.array(list(itertools.product(*[range(n) for n in grid])))  # (N, 3)
    phase = np.exp(-2j * np.pi * R0 @ kpts.T)  # (N, nk)
    H0 = np.einsum("rk,kab->rab", phase, Hk) / nk  # H at R0 (mod grid)
    # candidate images R0 + grid * T, T in -2..2 along periodic (grid > 1) directions
    ranges = [range(-2, 3) if n > 1 else range(1) for n in grid]
    T = np.array(list(itertools.product(*ranges)))
    images = R0[:, None, :] + T[None, :, :] * grid  # (N, nT, 3)
    disp = positions[None, :, :] - positions[:, None, :]  # (norb, norb, 3): tau_b - tau_a
    out: dict[tuple[int, int, int], np.ndarray] = {}
    cart = images @ cell  # (N, nT, 3)
    for r in range(len(R0)):
        # distances (nT, norb, norb)
        d = np.linalg.norm(cart[r][:, None, None, :] + disp[None], axis=-1)
        dmin = d.min(axis=0)
        close = d <= dmin[None] + tol
        deg = close.sum(axis=0)
        for t in np.nonzero(close.any(axis=(1, 2)))[0]:
            key = tuple(int(x) for x in images[r, t])
            block = np.where(close[t], H0[r] / deg, 0.0)
            if key in out:
                out[key] = out[key] + block
            else:
                out[key] = block
    keys = sorted(out, key=lambda k: (abs(k[0]) + abs(k[1]) + abs(k[2]), k))
    return np.array(keys, dtype=int), np.array([out[k] for k in keys])


def _occupied_electrons(data: BlochData, selected, fermi: float, width: float) -> float:
    nel = 0.0
    for q, sel in enumerate(selected):
        x = np.clip((data.eigenvalues[q][sel] - fermi) / width, -200, 200)
        nel += (2.0 / (1.0 + np.exp(x))).sum()
    return float(nel / len(selected))


def build_wannier(calc, atoms=None, basis: OrbitalBasis | dict = MOS2_BASIS,
                  selection="weight", width: float = 0.05, localization_steps: int = 0,
                  localization_step: float = 0.25) -> WannierResult:
    """Wannier H(R) of a converged GPAW LCAO calculation (see the module docstring).

    basis: projection orbitals per element; selection: 'weight' or an (emin, emax) window
    in eV; width: Fermi-Dirac width (eV) used to count the manifold's electrons;
    localization_steps: steepest-descent steps on the spread after the Löwdin projection
    (0: none; needs a calculation without any k-point symmetry, see localize.py).
    """
    if atoms is None:
        atoms = calc.get_atoms()
    if not isinstance(basis, OrbitalBasis):
        basis = OrbitalBasis(basis)
    setups = calc.dft.setups
    proj, orb_atoms, labels = projection_indices(setups, atoms.numbers, basis)
    data = bloch_data(calc)
    selected, gauges, smin = wannier_gauge(data, proj, selection)
    localization = None
    if localization_steps > 0:
        gauges, localization = _localized(calc, data, atoms, selected, gauges,
                                          localization_steps, localization_step)
    Hk = gauge_hamiltonian(data, selected, gauges)
    positions = atoms.positions[orb_atoms]
    R, H = fourier_ws(data.kpts, Hk, data.grid, atoms.cell[:], positions)
    nel = _occupied_electrons(data, selected, calc.get_fermi_level(), width)
    if isinstance(selection, str):
        sel_name = selection
    elif isinstance(selection, dict):
        sel_name = "frozen{}+outer{}".format(*(tuple(round(float(x), 3) for x in selection[k])
                                             for k in ("frozen", "outer")))
    else:
        sel_name = f"window{tuple(selection)}"
    return WannierResult(R=R, H=H, cell=atoms.cell[:].copy(), orbital_atoms=orb_atoms,
                         orbital_positions=positions, labels=labels, nelectrons=nel,
                         min_singular=smin, grid=data.grid, selection=sel_name,
                         localization=localization)


def _localized(calc, data, atoms, selected, gauges, steps: int, step: float):
    """Gauges after ``steps`` localization steps, and a summary of what they did."""
    from .localize import localization_matrices, localize, neighbours

    nb = neighbours(data.kpts, data.grid, atoms.cell[:])
    res = localize(localization_matrices(calc, nb, selected, gauges), nb, steps, step)
    new = [T @ V for T, V in zip(gauges, res.V)]
    summary = {"steps": steps, "step": step,
               "spread_functional": [float(res.spread[0]), float(res.spread[-1])],
               "spread_total": [float(res.spreads_initial.sum()),
                                float(res.spreads_final.sum())],
               "centre_shift_max": float(np.abs(res.centres_final - res.centres_initial
                                                ).max())}
    return new, summary


def gpaw_manifold_bands(calc, path_kpts: np.ndarray, basis: OrbitalBasis | dict = MOS2_BASIS,
                        selection="weight", txt=None, return_all: bool = False):
    """GPAW's (non-self-consistent) bands of the projected manifold at ``path_kpts``, eV.

    return_all: also return all GPAW eigenvalues on the path, (np, nbands).
    """
    if not isinstance(basis, OrbitalBasis):
        basis = OrbitalBasis(basis)
    bands_calc = calc.fixed_density(kpts=np.asarray(path_kpts), symmetry="off", txt=txt,
                                    nbands="nao")
    bands_calc.get_potential_energy()
    atoms = calc.get_atoms()
    proj, _, _ = projection_indices(calc.dft.setups, atoms.numbers, basis)
    ref, everything = [], []
    for wfs in bands_calc.dft.ibzwfs:
        S = _hermitian(np.asarray(wfs.S_MM.data))
        C = np.asarray(wfs.C_nM.data)
        e = np.asarray(wfs.eig_n) * Ha
        A = C.conj() @ S[:, proj]
        w = np.einsum("na,ab,nb->n", A, np.linalg.inv(S[np.ix_(proj, proj)]), A.conj()).real
        sel = select_bands(e, w, len(proj), selection)
        ref.append(e[sel][: len(proj)])
        everything.append(e)
    if return_all:
        return np.array(ref), np.array(everything)
    return np.array(ref)


def compare_bands(result: WannierResult, path_kpts: np.ndarray, ref: np.ndarray,
                  all_eigs: np.ndarray | None = None, nvalence: float | None = None,
                  window: tuple[float, float] | None = None) -> dict:
    """Errors (eV) of the Wannier bands against GPAW's on a path.

    ref: GPAW bands of the manifold selected by projection weight (np, norb), compared band
    by band (isolated manifolds). With ``window`` (absolute eV; the frozen window of a
    disentangled model) every GPAW band in ``all_eigs`` inside it is compared with the
    nearest Wannier band instead. Top-valence / bottom-conduction errors use ``all_eigs``
    and ``nvalence`` (total valence electrons) when given.
    """
    tb = result.eigenvalues(path_kpts)
    nocc = int(round(result.nelectrons / 2))
    if window is None:
        err = np.abs(tb - ref)
        per_band = err.max(axis=0)
    else:
        errs = []
        for e_tb, e_all in zip(tb, all_eigs):
            inside = e_all[(e_all >= window[0]) & (e_all <= window[1])]
            errs.append(np.abs(inside[:, None] - e_tb[None, :]).min(axis=1))
        err = np.concatenate(errs)
        per_band = None
    out = {
        "gpaw": ref,
        "wannier": tb,
        "max_error_per_band": per_band,
        "max_error": float(err.max()),
        "rms_error": float(np.sqrt((err ** 2).mean())),
        "nocc": nocc,
    }
    if all_eigs is not None and nvalence is not None:
        nt = int(round(nvalence / 2))
        out["vbm_error"] = float(np.abs(tb[:, nocc - 1] - all_eigs[:, nt - 1]).max())
        out["cbm_error"] = float(np.abs(tb[:, nocc] - all_eigs[:, nt]).max())
    elif 0 < nocc < ref.shape[1]:
        out["vbm_error"] = float(np.abs(tb - ref)[:, nocc - 1].max())
        out["cbm_error"] = float(np.abs(tb - ref)[:, nocc].max())
    return out


def band_error(calc, result: WannierResult, path_kpts: np.ndarray,
               basis: OrbitalBasis | dict = MOS2_BASIS, selection="weight",
               txt=None) -> dict:
    """Compare Wannier bands with GPAW's (non-self-consistent) bands at ``path_kpts``.

    Returns a dict with the GPAW manifold bands (nk, norb), the Wannier bands, the max
    absolute errors (eV) of every band, of the top valence and bottom conduction band of
    the manifold, and the RMS error.
    """
    ref = gpaw_manifold_bands(calc, path_kpts, basis, selection, txt)
    return compare_bands(result, path_kpts, ref)
