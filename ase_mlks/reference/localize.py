"""A fixed number of Marzari–Vanderbilt localization steps after the Löwdin projection.

The Löwdin-orthonormalized projected orbitals (wannier.py) are already well localized, and
a *fixed, small* number of steepest-descent steps on the spread, started from them, keeps
the basis a smooth function of the structure (a full minimization could jump between
minima from one structure to the next) — the option the DPWannier paper describes.

Spread of the Born–von Kármán supercell (Resta / Berghold form, as in ase.dft.wannier):
for the supercell directions d (the three axes, plus face diagonals for skewed cells) with
weights w_d (Å², ``ase.dft.wannier.calculate_weights``) and

    Z_d = 1/N_k sum_k T_k^dag M(k, b_d) T_{k+b_d},   M_mn(k, b) = <psi_mk| e^{-i b.r} |psi_n,k+b>,

the orbital centres are r_a = -sum_c L_c angle(Z_c,aa) / 2pi (fractional along the supercell
axes L_c) and the spreads Omega_a = sum_d w_d / (2pi)^2 * (-ln |Z_d,aa|^2) (Å^2). The steps
minimize sum_d w_d / (2pi)^2 * sum_a (1 - |Z_d,aa|^2) over unitary rotations T_k -> T_k V_k,
V_k = exp(X_k) with X_k anti-Hermitian; a rotation inside the selected subspace leaves
the bands on the k-grid unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Neighbours", "LocalizationResult", "neighbours", "localization_matrices",
           "localize", "centres_and_spreads"]


@dataclass
class Neighbours:
    """Finite-difference k-neighbours of a uniform grid.

    dirs: (nd, 3) int supercell reciprocal directions; b: (nd, 3) fractional k steps
    (dirs / grid); weights: (nd,) Å^2; next: (nd, nk) index of fold(k + b) in ``kpts``;
    large_cell: (3, 3) Å supercell.
    """

    dirs: np.ndarray
    b: np.ndarray
    weights: np.ndarray
    next: np.ndarray
    large_cell: np.ndarray


@dataclass
class LocalizationResult:
    """Rotations V (nk, norb, norb) and the spread history.

    spread: total spread functional (Å^2, 1 - |Z|^2 form) before each step and after the
    last (steps + 1,); spreads_initial / spreads_final: per-orbital Resta spreads (Å^2);
    centres_initial / centres_final: (norb, 3) Å.
    """

    V: np.ndarray
    spread: np.ndarray
    spreads_initial: np.ndarray
    spreads_final: np.ndarray
    centres_initial: np.ndarray
    centres_final: np.ndarray


def neighbours(kpts: np.ndarray, grid, cell: np.ndarray) -> Neighbours:
    """Neighbour table of the uniform Γ-centred ``grid`` holding ``kpts`` (nk, 3)."""
    from ase.dft.wannier import calculate_weights

    from .wannier import _key

    grid = np.asarray(grid, int)
    large = np.asarray(cell, float) * grid[:, None]
    weights, dirs = calculate_weights(large, normalize=False)
    dirs = np.asarray(dirs, int)
    b = dirs / grid[None, :]
    index = {_key(k, grid): i for i, k in enumerate(kpts)}
    nd, nk = len(dirs), len(kpts)
    nxt = np.empty((nd, nk), int)
    for d in range(nd):
        for i, k in enumerate(kpts):
            target = k + b[d]
            key = _key(target, grid)
            if key not in index:
                raise ValueError(f"k-point {target} is not on the {tuple(grid)} grid")
            nxt[d, i] = index[key]
    return Neighbours(dirs, b, np.asarray(weights, float), nxt, large)


def _grid_wave_functions(calc, k: int, nbands: int):
    """Bands 0..nbands-1 of k-point ``k`` on the real-space grid (GPAW PWFD object).

    The new GPAW's own ``get_wannier_localization_matrix`` cannot expand LCAO states on
    the grid (it passes no basis set), so the expansion is done here with the basis of the
    calculation's Hamiltonian.
    """
    dft = calc.dft
    basis = getattr(dft.scf_loop.hamiltonian, "basis", None)
    if basis is None:
        raise ValueError("localization steps need an LCAO calculation")
    wfs = dft.ibzwfs._get_wfs(k, 0).collect_bands(0, nbands)
    return wfs.to_uniform_grid_wave_functions(dft.density.nt_sR.desc, basis)


def localization_matrices(calc, nb: Neighbours, selected, gauges) -> np.ndarray:
    """Z0 (nd, nk, norb, norb) = T_k^dag M(k, b_d) T_{k+b_d} from a GPAW LCAO calculation.

    ``calc`` must hold every k-point of the grid (symmetry fully off), in the order of
    ``nb``. M is GPAW's Wannier integral (pseudo wave functions on the real-space grid plus
    the PAW overlap corrections, gpaw.new.wannier).
    """
    from gpaw.new.wannier import add_wannier_correction

    kpts = np.asarray(calc.get_bz_k_points())
    if len(calc.dft.ibzwfs.ibz) != len(kpts):
        raise ValueError("localization steps need every k-point of the grid: run the "
                         "non-self-consistent step with symmetry='off'")
    nbands = int(max(int(np.max(s)) for s in selected)) + 1
    gd = calc.dft.density.nt_sR.desc._gd
    nd, nk = nb.next.shape
    norb = gauges[0].shape[1]
    Z0 = np.empty((nd, nk, norb, norb), complex)
    for k in range(nk):
        wk = _grid_wave_functions(calc, k, nbands)
        for d in range(nd):
            k1 = nb.next[d, k]
            wk1 = wk if k1 == k else _grid_wave_functions(calc, k1, nbands)
            # the grid functions are whole Bloch functions (phase e^{ik.r} included) and
            # psi_k1 is psi_{k+b} whatever the folding, so exp(-i b.r) between them
            # gives <u_k|u_{k+b}> (G_c in units of the cell's reciprocal vectors)
            G_c = nb.b[d]
            M = gd.wannier_matrix(wk.psit_nX.data, wk1.psit_nX.data, G_c, nbands)
            add_wannier_correction(M, G_c, wk, wk1, nbands)
            M = np.asarray(M)[np.ix_(selected[k], selected[k1])]
            Z0[d, k] = gauges[k].conj().T @ M @ gauges[k1]
    return Z0


def centres_and_spreads(Z: np.ndarray, nb: Neighbours) -> tuple[np.ndarray, np.ndarray]:
    """Centres (norb, 3) Å and Resta spreads (norb,) Å^2 from supercell Z (nd, norb, norb).

    The first three directions must be the supercell axes (as calculate_weights orders
    them).
    """
    diag = np.diagonal(Z, axis1=1, axis2=2)  # (nd, norb)
    frac = np.mod(-np.angle(diag[:3]).T / (2 * np.pi), 1.0)  # (norb, 3)
    centres = frac @ nb.large_cell
    spreads = (nb.weights[:, None] / (2 * np.pi) ** 2
               * -np.log(np.maximum(np.abs(diag) ** 2, 1e-300))).sum(axis=0)
    return centres, spreads


def _supercell_Z(Z0, V, nxt):
    """Z_d = 1/nk sum_k V_k^dag Z0[d, k] V_{next(k)} (torch)."""
    import torch

    Vn = V[torch.as_tensor(nxt)]  # (nd, nk, norb, norb)
    return (V.conj().transpose(-1, -2)[None] @ Z0 @ Vn).mean(dim=1)


def localize(Z0: np.ndarray, nb: Neighbours, steps: int, step: float = 0.25
             ) -> LocalizationResult:
    """``steps`` steepest-descent steps on the spread from the gauge of ``Z0``.

    The step is ``step`` divided by the initial mean spread per orbital (Å^2), which makes
    it independent of the k-grid (the weights w_d grow with the supercell, the spread does
    not); a step that would raise the spread is halved until it does not, so the spread
    never increases.
    """
    import torch

    nd, nk, norb, _ = Z0.shape
    Z0t = torch.as_tensor(Z0, dtype=torch.complex128)
    w = torch.as_tensor(nb.weights / (2 * np.pi) ** 2, dtype=torch.float64)

    def functional(V):
        Z = _supercell_Z(Z0t, V, nb.next)
        d = torch.diagonal(Z, dim1=-2, dim2=-1)
        return (w[:, None] * (1.0 - d.abs() ** 2)).sum()

    V = torch.eye(norb, dtype=torch.complex128).repeat(nk, 1, 1)
    history = []
    with torch.no_grad():
        z_init = _supercell_Z(Z0t, V, nb.next).numpy()
        scale = max(functional(V).item() / norb, 1e-6)
    for _ in range(steps):
        K = torch.zeros((nk, norb, norb), dtype=torch.complex128, requires_grad=True)
        X = K - K.conj().transpose(-1, -2)
        f = functional(V @ torch.linalg.matrix_exp(X))
        f.backward()
        history.append(f.item())
        g = K.grad - K.grad.conj().transpose(-1, -2)  # anti-Hermitian descent direction
        eta = step / scale
        with torch.no_grad():
            for _ in range(20):
                trial = V @ torch.linalg.matrix_exp(-eta * g)
                if functional(trial).item() <= f.item():
                    V = trial
                    break
                eta *= 0.5
    with torch.no_grad():
        history.append(float(functional(V)))
        z_final = _supercell_Z(Z0t, V, nb.next).numpy()
    c0, s0 = centres_and_spreads(z_init, nb)
    c1, s1 = centres_and_spreads(z_final, nb)
    return LocalizationResult(V.detach().numpy(), np.array(history), s0, s1, c0, c1)
