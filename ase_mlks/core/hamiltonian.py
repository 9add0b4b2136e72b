"""Real-space tight-binding Hamiltonian H(R) (and overlap S(R)) with Bloch sums and eigensolvers.

Convention: ``H_ij(R) = <i, 0 | H | j, R>`` with R an integer lattice vector; the Bloch sum
is ``H_ij(k) = sum_R exp(2 pi i k.R) H_ij(R)`` for fractional k (lattice gauge, no
orbital-position phase: eigenvalues do not depend on that choice). Hermiticity reads
``H_ji(-R) = conj(H_ij(R))``.

Storage is sparse (COO over all R), so the same object serves a 10-orbital primitive cell
and a 16,000-orbital moiré cell: dense ``eigh`` for the former, shift-invert Lanczos
(``eigsh``) near a chosen energy for the latter. The shift-invert inverse comes from a sparse
LU when H(k) is sparse enough, else from a dense Bunch–Kaufman factorization (LAPACK
``zhetrf``): a moiré H(k) with a 9 Å hopping range couples each orbital to ~20 % of the
cell, and a sparse LU of it fills in completely and is slower than the dense one.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .electrons import fermi_level as _fermi_level
from .errors import AseMlksError
from .io import read_array, write_array

DENSE_LIMIT = 3000  # orbitals; above this, full dense diagonalization is refused unless forced
# Fraction of nonzero (i, j) orbital pairs above which shift-invert factorizes H(k) densely.
SPARSE_FILL_LIMIT = 0.03


class TBHamiltonian:
    """Sparse real-space Hamiltonian of a crystal, molecule or slab.

    Parameters
    ----------
    cell: (3, 3) lattice vectors in Å (rows).
    norb: number of orbitals in the cell.
    R: (nR, 3) integer lattice vectors.
    r_index, rows, cols: (nnz,) entry coordinates: ``H[rows, cols](R[r_index])``.
    h: (nnz,) values in eV (real or complex).
    s: optional (nnz,) overlap values on the same entries (None = orthonormal basis).
    orbital_atoms: optional (norb,) atom index of every orbital (for ``block``).
    nelectrons: electrons held by these orbitals (for the Fermi level).
    pbc: periodic directions; k components along non-periodic ones are ignored.
    """

    def __init__(self, cell, norb: int, R, r_index, rows, cols, h, s=None, *,
                 orbital_atoms=None, nelectrons: float | None = None, pbc=(True, True, True),
                 labels: Sequence[str] | None = None):
        self.cell = np.asarray(cell, dtype=float).reshape(3, 3)
        self.norb = int(norb)
        self.R = np.asarray(R, dtype=np.int64).reshape(-1, 3)
        self.r_index = np.asarray(r_index, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        self.h = np.asarray(h)
        self.s = None if s is None else np.asarray(s)
        self.orbital_atoms = None if orbital_atoms is None else np.asarray(orbital_atoms, int)
        self.nelectrons = None if nelectrons is None else float(nelectrons)
        self.pbc = np.asarray(pbc, dtype=bool).reshape(3)
        self.labels = list(labels) if labels is not None else None
        n = len(self.h)
        if not (len(self.r_index) == len(self.rows) == len(self.cols) == n):
            raise ValueError("r_index, rows, cols and h must have the same length")
        if self.s is not None and len(self.s) != n:
            raise ValueError("s must have one value per entry of h")
        if n and (self.rows.max() >= self.norb or self.cols.max() >= self.norb):
            raise ValueError("orbital index out of range")
        if n and self.r_index.max() >= len(self.R):
            raise ValueError("r_index out of range")

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_dense(cls, cell, R, H, S=None, **kwargs) -> TBHamiltonian:
        """From dense blocks ``H[r]`` of shape (nR, norb, norb) (and optional ``S``)."""
        H = np.asarray(H)
        mask = H != 0
        if S is not None:
            S = np.asarray(S)
            mask |= S != 0
        r, i, j = np.nonzero(mask)
        return cls(cell, H.shape[1], R, r, i, j, H[r, i, j],
                   None if S is None else S[r, i, j], **kwargs)

    @classmethod
    def from_coo(cls, cell, norb: int, R_of_entry, rows, cols, values, s_values=None,
                 **kwargs) -> TBHamiltonian:
        """From entries that each carry their own lattice vector ``R_of_entry`` (nnz, 3)."""
        R_of_entry = np.asarray(R_of_entry, dtype=np.int64).reshape(-1, 3)
        R, r_index = np.unique(R_of_entry, axis=0, return_inverse=True)
        return cls(cell, norb, R, r_index.ravel(), rows, cols, values, s_values, **kwargs)

    # -- basic properties ---------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return len(self.h)

    @property
    def is_complex(self) -> bool:
        return np.iscomplexobj(self.h)

    def copy(self) -> TBHamiltonian:
        return TBHamiltonian(self.cell, self.norb, self.R.copy(), self.r_index.copy(),
                             self.rows.copy(), self.cols.copy(), self.h.copy(),
                             None if self.s is None else self.s.copy(),
                             orbital_atoms=self.orbital_atoms, nelectrons=self.nelectrons,
                             pbc=self.pbc, labels=self.labels)

    def entry_R(self) -> np.ndarray:
        """Lattice vector of every entry, shape (nnz, 3)."""
        return self.R[self.r_index]

    def _keys(self, R_entries: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.concatenate([R_entries, rows[:, None], cols[:, None]], axis=1)

    # -- hermiticity --------------------------------------------------------------------
    def hermitize(self) -> TBHamiltonian:
        """Return ``(H + H^dagger) / 2`` (and the same for S), entries coalesced.

        Models predict each hopping once per ordered pair; averaging with the transposed
        partner makes the Bloch matrices exactly Hermitian at every k.
        """
        Re = self.entry_R()
        keys = np.concatenate([self._keys(Re, self.rows, self.cols),
                               self._keys(-Re, self.cols, self.rows)])
        vals = np.concatenate([self.h, np.conj(self.h)]) / 2
        svals = None
        if self.s is not None:
            svals = np.concatenate([self.s, np.conj(self.s)]) / 2
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.ravel()
        h = _segment_sum(vals, inv, len(uniq))
        s = None if svals is None else _segment_sum(svals, inv, len(uniq))
        if not self.is_complex:
            h = h.real
            s = None if s is None else s.real
        return TBHamiltonian.from_coo(self.cell, self.norb, uniq[:, :3], uniq[:, 3], uniq[:, 4],
                                      h, s, orbital_atoms=self.orbital_atoms,
                                      nelectrons=self.nelectrons, pbc=self.pbc,
                                      labels=self.labels)

    def hermiticity_error(self) -> float:
        """max |H - H^dagger| over all entries (eV); 0 for a Hermitian model."""
        return float(np.abs(self.to_dense_R() - _dagger_R(self)).max()) if self.nnz else 0.0

    # -- Bloch sums -----------------------------------------------------------------------
    def _bloch(self, values: np.ndarray, k, sparse: bool):
        k = np.asarray(k, dtype=float).reshape(3) * self.pbc
        phase = np.exp(2j * np.pi * (self.R @ k))[self.r_index]
        m = sp.coo_matrix((values * phase, (self.rows, self.cols)),
                          shape=(self.norb, self.norb)).tocsr()
        return m if sparse else m.toarray()

    def hk(self, k, sparse: bool = False):
        """H(k), (norb, norb) complex; dense ndarray or scipy CSR if ``sparse``."""
        return self._bloch(self.h, k, sparse)

    def sk(self, k, sparse: bool = False):
        """S(k); the identity for an orthonormal basis."""
        if self.s is None:
            return sp.identity(self.norb, dtype=complex, format="csr") if sparse \
                else np.eye(self.norb, dtype=complex)
        return self._bloch(self.s, k, sparse)

    # -- eigenvalues ----------------------------------------------------------------------
    def eigenvalues(self, kpts, nbands: int | None = None, sigma: float | None = None,
                    return_vectors: bool = False, solver: str = "auto", workers: int = 1):
        """Band energies (nk, nbands) in eV, ascending at each k.

        ``nbands=None``: all bands (dense). With ``nbands`` and ``sigma`` (eV): the
        ``nbands`` states nearest ``sigma`` — by shift-invert Lanczos (``eigsh``) for large
        systems (``solver='sparse'`` or auto above ``DENSE_LIMIT`` orbitals), by dense
        ``eigh`` otherwise. Vectors, if asked, come as (nk, norb, nbands).
        ``workers`` > 1 splits a shift-invert k-path into that many contiguous pieces solved
        in forked processes (one per core; set ``OMP_NUM_THREADS=1`` so they do not also
        thread their LAPACK calls). Results agree with ``workers=1`` to the solver tolerance.
        """
        kpts = np.atleast_2d(np.asarray(kpts, dtype=float))
        if solver == "auto":
            solver = self.choose_solver(nbands, sigma)
        solvers = {"dense": self._eig_dense, "sparse": self._eig_sparse,
                   "shift-invert": self._eig_shift_invert}
        if solver not in solvers:
            raise ValueError(f"unknown solver {solver!r}; use 'auto' or one of {list(solvers)}")
        if solver == "dense" and self.norb > 4 * DENSE_LIMIT:
            raise AseMlksError(
                f"{self.norb} orbitals are too many for dense diagonalization; pass nbands "
                "and sigma (eV) to use the sparse shift-invert solver")
        if solver != "dense" and (sigma is None or nbands is None):
            raise ValueError(f"the {solver} solver needs both nbands and sigma")
        if solver == "shift-invert" and len(kpts) > 1 and self.s is None:
            if workers > 1 and len(kpts) >= 2 * workers:
                values, vectors = self._eig_path_parallel(kpts, nbands, sigma, workers)
            else:
                values, vectors = self._eig_path(kpts, nbands, sigma)
        else:
            values, vectors = [], []
            for k in kpts:
                e, v = solvers[solver](k, nbands, sigma)
                values.append(e)
                vectors.append(v)
        values = np.array(values)
        return (values, np.array(vectors)) if return_vectors else values

    def _eig_dense(self, k, nbands, sigma):
        H = self.hk(k)
        S = None if self.s is None else self.sk(k)
        e, v = scipy.linalg.eigh(H, S)
        if nbands is not None:
            if sigma is None:
                sel = np.arange(min(nbands, len(e)))
            else:
                sel = np.sort(np.argsort(np.abs(e - sigma), kind="stable")[:nbands])
            e, v = e[sel], v[:, sel]
        return e, v

    def pair_fill(self) -> float:
        """Fraction of the norb² orbital pairs (i, j) coupled by some H_ij(R)."""
        pairs = np.unique(self.rows * self.norb + self.cols)
        return len(pairs) / float(self.norb) ** 2

    def choose_solver(self, nbands: int | None, sigma: float | None) -> str:
        """The solver 'auto' uses for these arguments (see ``eigenvalues``)."""
        if sigma is None or nbands is None or self.norb <= DENSE_LIMIT:
            return "dense"
        return "sparse" if self.pair_fill() < SPARSE_FILL_LIMIT else "shift-invert"

    def _shifted_inverse(self, k, sigma):
        """x -> (H(k) - sigma S(k))^-1 x by a dense Bunch–Kaufman LDL^H factorization."""
        H = self.hk(k)
        A = H - sigma * (np.eye(self.norb) if self.s is None else self.sk(k))
        # Bunch–Kaufman LDL^H: half the flops of LU for a Hermitian matrix. LAPACK's
        # blocked algorithm needs the workspace query, or it falls back to unblocked code.
        lwork = int(scipy.linalg.lapack.zhetrf_lwork(self.norb, lower=1)[0].real)
        ldl, ipiv, info = scipy.linalg.lapack.zhetrf(A, lower=1, lwork=max(lwork, 1),
                                                     overwrite_a=True)
        if info > 0:
            raise AseMlksError(f"H(k) - sigma is singular: sigma = {sigma} eV is an "
                               "eigenvalue; shift it slightly")

        def solve(x):
            out, _ = scipy.linalg.lapack.zhetrs(ldl, ipiv, np.asarray(x, complex), lower=1)
            return out

        return solve

    def _eig_shift_invert(self, k, nbands, sigma, solve=None):
        H = self.hk(k, sparse=True)
        S = None if self.s is None else self.sk(k, sparse=True)
        solve = solve or self._shifted_inverse(k, sigma)
        op = spla.LinearOperator(H.shape, matvec=solve, matmat=solve, dtype=complex)
        e, v = spla.eigsh(H, k=nbands, M=S, sigma=sigma, OPinv=op, which="LM", tol=1e-12)
        order = np.argsort(e)
        return e[order], v[:, order]

    def _eig_path(self, kpts, nbands, sigma, tol: float = 1e-4, max_iter: int = 20,
                  refactor_every: int = 10):
        """Shift-invert along a sequence of nearby k-points (orthonormal basis).

        Fresh shift-invert Lanczos costs one dense factorization of H(k) - sigma and a few
        hundred single-vector triangular solves per k-point (measured on 4,796 orbitals:
        5 s + 18-21 s). Along a band path H(k) changes little between neighbours, so each
        k-point instead runs a block Davidson iteration (:func:`_davidson_near`) started from
        the previous k-point's eigenvectors and preconditioned by the factorization of an
        earlier k-point, renewed every ``refactor_every`` k-points or when Davidson does not
        converge in ``max_iter`` iterations. ARPACK runs only at the first k-point and
        as the last resort. Converged means the residuals ||H x - e x|| of the nbands states
        nearest sigma are below ``tol`` (eV); eigenvalue errors are ~tol^2 / (level
        spacing), checked against dense diagonalization in the tests and against fresh
        solves on the 1,308-atom cell (docs/core.md). Davidson follows the states it starts
        from, so it tracks 2 * nbands states: a band entering the nbands window from outside
        between two k-points is then already among them.
        """
        m = min(2 * nbands, self.norb - 1)
        n_probe = max(4, nbands // 2)
        rng = np.random.default_rng(0)  # fixed: the same path gives the same numbers
        values, vectors, solve, basis = [], [], None, None
        for i, k in enumerate(kpts):
            H = self.hk(k, sparse=True)
            fresh = basis is None or i % refactor_every == 0
            if fresh:
                solve = self._shifted_inverse(k, sigma)
            result = None
            if basis is not None:
                # Davidson only refines the states it starts from. A band that enters the
                # window between two k-points is caught by probes: one shift-invert step on
                # random vectors; orthogonal to the tracked states, what remains of them is
                # dominated by the nearest states not yet tracked.
                probes = solve(rng.standard_normal((self.norb, n_probe))
                               + 1j * rng.standard_normal((self.norb, n_probe)))
                start = np.hstack([basis, probes])
                result = _davidson_near(H, start, sigma, nbands, solve, tol, max_iter, m=m)
                if result is None and not fresh:  # preconditioner too stale: refactor here
                    solve, fresh = self._shifted_inverse(k, sigma), True
                    result = _davidson_near(H, start, sigma, nbands, solve, tol, max_iter, m=m)
            if result is None:  # first k-point, or no convergence even with the exact inverse
                result = self._eig_shift_invert(k, m, sigma, solve)
            e, v = result
            basis = v
            keep = np.sort(np.argsort(np.abs(e - sigma), kind="stable")[:nbands])
            values.append(e[keep])
            vectors.append(v[:, keep])
        return values, vectors

    def _eig_path_parallel(self, kpts, nbands, sigma, workers: int):
        """``_eig_path`` on ``workers`` contiguous pieces of the path, in forked processes.

        Each piece pays one fresh ARPACK solve at its first k-point (~5x a Davidson step on
        a moiré cell), so pieces should hold tens of k-points. Fork, not spawn: the children
        inherit this Hamiltonian instead of unpickling a copy of it.
        """
        global _PATH_HAM
        pieces = np.array_split(np.arange(len(kpts)), workers)  # caller: >= 2 k per piece
        _PATH_HAM = self
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = list(pool.map(_path_piece, [(kpts[p], nbands, sigma)
                                                      for p in pieces]))
        finally:
            _PATH_HAM = None
        values = [e for vals, _ in results for e in vals]
        vectors = [v for _, vecs in results for v in vecs]
        return values, vectors

    def _eig_sparse(self, k, nbands, sigma):
        H = self.hk(k, sparse=True).tocsc()
        S = None if self.s is None else self.sk(k, sparse=True).tocsc()
        # Shift-invert: Lanczos on (H - sigma S)^-1 converges to the states nearest sigma.
        e, v = spla.eigsh(H, k=nbands, M=S, sigma=sigma, which="LM", tol=1e-12)
        order = np.argsort(e)
        return e[order], v[:, order]

    def fermi_level(self, kmesh=(12, 12, 1), width: float = 0.05,
                    nelectrons: float | None = None) -> float:
        """Fermi level (eV) from the electron count on a Γ-centred k-mesh with FD smearing."""
        n = self.nelectrons if nelectrons is None else nelectrons
        if n is None:
            raise AseMlksError("this Hamiltonian does not know its electron count")
        kpts = monkhorst_pack_gamma(np.where(self.pbc, kmesh, 1))
        return _fermi_level(self.eigenvalues(kpts), None, n, width)

    # -- dense views and blocks -----------------------------------------------------------
    def to_dense_R(self, which: str = "h") -> np.ndarray:
        """Dense (nR, norb, norb) array of H(R) (or S(R) with ``which='s'``); small systems only."""
        vals = self.h if which == "h" else self.s
        if vals is None:
            raise AseMlksError("this Hamiltonian has no overlap")
        out = np.zeros((len(self.R), self.norb, self.norb), dtype=vals.dtype)
        out[self.r_index, self.rows, self.cols] = vals
        return out

    def R_index(self, R) -> int:
        """Index of lattice vector R in ``self.R``; KeyError if absent."""
        hit = np.nonzero((self.R == np.asarray(R, int)).all(axis=1))[0]
        if not len(hit):
            raise KeyError(f"lattice vector {tuple(R)} not present")
        return int(hit[0])

    def block(self, i_atom: int, j_atom: int, R=(0, 0, 0), which: str = "h") -> np.ndarray:
        """Dense block H_ij(R) between the orbitals of two atoms."""
        if self.orbital_atoms is None:
            raise AseMlksError("this Hamiltonian has no orbital -> atom map")
        oi = np.nonzero(self.orbital_atoms == i_atom)[0]
        oj = np.nonzero(self.orbital_atoms == j_atom)[0]
        vals = self.h if which == "h" else self.s
        out = np.zeros((len(oi), len(oj)), dtype=vals.dtype)
        try:
            r = self.R_index(R)
        except KeyError:
            return out
        sel = (self.r_index == r) & np.isin(self.rows, oi) & np.isin(self.cols, oj)
        out[np.searchsorted(oi, self.rows[sel]), np.searchsorted(oj, self.cols[sel])] = vals[sel]
        return out

    # -- HDF5 -----------------------------------------------------------------------------
    def to_hdf5(self, group, dtype=np.float32, h_quantum: float | None = None) -> None:
        """Write into an h5py group (values as float32/complex64 by default).

        h_quantum: store the real H(R) values as int32 multiples of this (eV) instead —
        ~35 % smaller files at an absolute error <= h_quantum/2 (see ``core.io``).
        """
        write_array(group, "cell", self.cell, np.float64)
        write_array(group, "pbc", self.pbc)
        write_array(group, "R", self.R.astype(np.int32))
        write_array(group, "r_index", self.r_index.astype(np.int32))
        write_array(group, "rows", self.rows.astype(np.int32))
        write_array(group, "cols", self.cols.astype(np.int32))
        write_array(group, "h", self.h, dtype, quantum=h_quantum)
        if self.s is not None:
            write_array(group, "s", self.s, dtype)
        if self.orbital_atoms is not None:
            write_array(group, "orbital_atoms", self.orbital_atoms.astype(np.int32))
        group.attrs["norb"] = self.norb
        group.attrs["format"] = "ase_mlks.TBHamiltonian/1"
        if self.nelectrons is not None:
            group.attrs["nelectrons"] = self.nelectrons
        if self.labels is not None:
            group.attrs["labels"] = np.array(self.labels, dtype="S")

    @classmethod
    def from_hdf5(cls, group) -> TBHamiltonian:
        if group.attrs.get("format", "") != "ase_mlks.TBHamiltonian/1":
            raise AseMlksError(f"HDF5 group {group.name} holds no TBHamiltonian")
        labels = group.attrs.get("labels")
        return cls(read_array(group, "cell"), int(group.attrs["norb"]), read_array(group, "R"),
                   read_array(group, "r_index"), read_array(group, "rows"),
                   read_array(group, "cols"), read_array(group, "h"),
                   read_array(group, "s") if "s" in group else None,
                   orbital_atoms=read_array(group, "orbital_atoms")
                   if "orbital_atoms" in group else None,
                   nelectrons=group.attrs.get("nelectrons"),
                   pbc=read_array(group, "pbc"),
                   labels=None if labels is None else [x.decode() for x in labels])


_PATH_HAM: TBHamiltonian | None = None  # the Hamiltonian forked path workers solve


def _path_piece(args):
    """One worker's piece of a k-path: (eigenvalues, eigenvectors) lists."""
    kpts, nbands, sigma = args
    return _PATH_HAM._eig_path(kpts, nbands, sigma)


def _extend_basis(V: np.ndarray, T: np.ndarray) -> np.ndarray | None:
    """Orthonormal columns spanning the part of T orthogonal to orthonormal V (None if T
    adds nothing). Classical Gram-Schmidt twice ("twice is enough"), then an SVD keeps only
    the directions that are not round-off (several columns of T may be nearly dependent,
    and V may already span almost the whole space in a small system)."""
    scale = max(float(np.linalg.norm(T, axis=0).max()), 1e-300)
    for _ in range(2):
        T = T - V @ (V.conj().T @ T)
    U, sv, _ = np.linalg.svd(T, full_matrices=False)
    U = U[:, sv > 1e-8 * scale]
    if not U.shape[1]:
        return None
    U, _ = np.linalg.qr(U - V @ (V.conj().T @ U))
    return U


def _davidson_near(H, start: np.ndarray, sigma: float, nbands: int, solve, tol: float,
                   max_iter: int, max_basis: int = 4, m: int | None = None):
    """Eigenpairs of Hermitian H nearest ``sigma`` by block Davidson from the (n, m) vectors
    ``start`` (m >= nbands), preconditioned by ``solve`` ~ (H - sigma)^-1.

    Interior eigenvalues need harmonic Ritz extraction: plain Rayleigh-Ritz produces
    spurious Ritz values near sigma (mixtures of states far above and below) and stalls.
    Only the ``nbands`` states nearest sigma must reach residual < ``tol``; the other
    m - nbands are a buffer that speeds convergence and catches bands entering the window.
    H @ V is kept and extended, recomputed only at a thick restart (the sparse products
    dominate otherwise).
    Returns (e, v) of the m (default: as many as ``start`` has columns) tracked states
    (v orthonormal, e ascending), or None when not converged in ``max_iter`` iterations.
    """
    m = start.shape[1] if m is None else m
    V, _ = np.linalg.qr(start)
    HV = H @ V
    for _ in range(max_iter):
        W = HV - sigma * V
        A = V.conj().T @ W
        B = W.conj().T @ W
        # harmonic Ritz: (V^H (H - s) V) y = mu (W^H W) y; largest |mu| = nearest sigma
        try:
            mu, Y = scipy.linalg.eigh(0.5 * (A + A.conj().T), 0.5 * (B + B.conj().T))
        except np.linalg.LinAlgError:  # sigma (almost) an eigenvalue: W^H W singular
            return None
        Y = Y[:, np.argsort(-np.abs(mu), kind="stable")[:m]]
        X, HX = V @ Y, HV @ Y
        norm = np.linalg.norm(X, axis=0)
        X, HX = X / norm, HX / norm
        theta = np.real(np.einsum("ij,ij->j", X.conj(), HX))
        R = HX - X * theta
        res = np.linalg.norm(R, axis=0)
        # A Rayleigh quotient theta with residual r has an eigenvalue within |r| of it, so
        # a state can belong to the nbands nearest sigma only if |theta - s| - |r| is within
        # the nbands-th distance: all such states must converge, not just the nbands
        # nearest by current theta (near-ties at the window edge are common in big cells).
        dist = np.abs(theta - sigma)
        edge = np.sort(dist)[min(nbands, m) - 1]
        bad = (dist - res <= edge) & (res >= tol)
        if not bad.any():
            # the tracked subspace is converged: orthonormal eigenvectors by plain
            # Rayleigh-Ritz within it (safe there, no far-away components left)
            Q, _ = np.linalg.qr(X)
            e, Z = scipy.linalg.eigh(Q.conj().T @ (H @ Q))
            return e, Q @ Z
        T = solve(R[:, bad])
        if V.shape[1] + T.shape[1] > min(max_basis * m, H.shape[0]):  # thick restart
            V, _ = np.linalg.qr(X)
            HV = H @ V
        T = _extend_basis(V, T)
        if T is None:
            return None
        V, HV = np.hstack([V, T]), np.hstack([HV, H @ T])
    return None


def _segment_sum(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.result_type(values, np.complex128))
    np.add.at(out, index, values)
    return out


def _dagger_R(ham: TBHamiltonian) -> np.ndarray:
    """Dense H^dagger in the R representation: out[R] = H(-R)^dagger (missing -R -> zeros)."""
    dense = ham.to_dense_R()
    out = np.zeros_like(dense)
    lookup = {tuple(r): n for n, r in enumerate(ham.R)}
    for n, r in enumerate(ham.R):
        m = lookup.get(tuple(-r))
        if m is not None:
            out[n] = dense[m].conj().T
    return out


def monkhorst_pack_gamma(size) -> np.ndarray:
    """Γ-centred uniform k-mesh in fractional coordinates, shape (prod(size), 3)."""
    size = np.asarray(size, dtype=int)
    axes = [np.arange(n) / n for n in size]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid - np.round(grid)  # fold into (-1/2, 1/2]
