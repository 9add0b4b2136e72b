"""TBHamiltonian: Bloch sums against analytic bands, Hermiticity, solvers, HDF5, Fermi level."""

import h5py
import numpy as np
import pytest
import scipy.linalg
from ase import Atoms
from ase.build import graphene

from ase_mlks.core.electrons import electron_count, fermi_level
from ase_mlks.core.hamiltonian import TBHamiltonian, monkhorst_pack_gamma
from ase_mlks.testing import PzTightBindingCalc

T = -2.7


def graphene_sheet(repeat=(1, 1, 1)) -> Atoms:
    atoms = graphene(a=2.46, vacuum=8.0).repeat(repeat)
    atoms.pbc = (True, True, False)
    return atoms


def analytic_graphene(atoms: Atoms, k: np.ndarray) -> np.ndarray:
    """Nearest-neighbour graphene bands -/+|t f(k)|, f = sum_d exp(i k.d) over the 3 bonds."""
    cands = [atoms.positions[1] - atoms.positions[0] + np.array([n1, n2, 0]) @ atoms.cell
             for n1 in (-1, 0, 1) for n2 in (-1, 0, 1)]
    bonds = sorted(cands, key=np.linalg.norm)[:3]
    kcart = 2 * np.pi * k @ atoms.cell.reciprocal()
    f = np.abs(sum(np.exp(1j * kcart @ d) for d in bonds))
    return np.stack([-abs(T) * f, abs(T) * f], axis=1)


def test_graphene_bands_match_analytic_formula():
    atoms = graphene_sheet()
    ham = PzTightBindingCalc(t=T, d0=2.46 / np.sqrt(3), cutoff=1.6).build_hamiltonian(atoms)
    assert ham.nnz == 6 + 2  # 3 bonds each way + 2 on-site zeros
    k = np.random.default_rng(0).random((40, 3))
    np.testing.assert_allclose(ham.eigenvalues(k), analytic_graphene(atoms, k), atol=1e-10)
    # Dirac point at the K corner of the hexagonal zone: zero gap
    K = atoms.cell.bandpath("GK", npoints=2).special_points["K"]
    assert np.abs(ham.eigenvalues([K])).max() < 1e-10


def test_two_orbital_chain_bands_and_k_periodicity():
    """A hand-built s-p chain: H(k) = [[es + 2 ss cos, 2i sp sin], [.., ep + 2 pp cos]]."""
    es, ep, ss, pp, sp = -1.0, 2.0, -0.5, 0.7, 0.3
    cell = np.diag([2.0, 10.0, 10.0])
    entries = [((0, 0, 0), 0, 0, es), ((0, 0, 0), 1, 1, ep)]
    for s in (1, -1):
        entries += [((s, 0, 0), 0, 0, ss), ((s, 0, 0), 1, 1, pp),
                    ((s, 0, 0), 0, 1, s * sp), ((s, 0, 0), 1, 0, -s * sp)]
    R, rows, cols, vals = zip(*entries)
    ham = TBHamiltonian.from_coo(cell, 2, R, rows, cols, np.array(vals), pbc=(1, 0, 0))
    k = np.linspace(-0.5, 0.5, 21)[:, None] * [1, 0, 0]
    c, s = np.cos(2 * np.pi * k[:, 0]), np.sin(2 * np.pi * k[:, 0])
    a, d, b = es + 2 * ss * c, ep + 2 * pp * c, 2 * sp * s
    mean, half = (a + d) / 2, np.sqrt(((a - d) / 2) ** 2 + b**2)
    np.testing.assert_allclose(ham.eigenvalues(k), np.stack([mean - half, mean + half], 1),
                               atol=1e-12)
    np.testing.assert_allclose(ham.eigenvalues(k + [1, 0, 0]), ham.eigenvalues(k), atol=1e-12)
    assert ham.hermiticity_error() < 1e-15


def test_hermitize_repairs_one_sided_hopping_and_checks_error():
    h = TBHamiltonian.from_coo(np.eye(3) * 3, 2, [(1, 0, 0), (0, 0, 0)], [0, 0], [1, 1],
                               np.array([1.0, 0.5]))
    assert h.hermiticity_error() > 0.1
    hh = h.hermitize()
    assert hh.hermiticity_error() < 1e-15
    for k in np.random.default_rng(1).random((5, 3)):
        m = hh.hk(k)
        np.testing.assert_allclose(m, m.conj().T, atol=1e-14)


def test_sparse_and_dense_eigenvalues_agree_on_1000_plus_orbitals():
    atoms = graphene_sheet((24, 24, 1))  # 1152 orbitals
    rng = np.random.default_rng(3)
    calc = PzTightBindingCalc(t=T, cutoff=1.6, onsite=rng.normal(0, 0.3, len(atoms)))
    ham = calc.build_hamiltonian(atoms)
    assert ham.norb == 1152
    k = [[0.1, 0.2, 0.0]]
    dense = ham.eigenvalues(k, nbands=12, sigma=0.3, solver="dense")
    sparse = ham.eigenvalues(k, nbands=12, sigma=0.3, solver="sparse")
    np.testing.assert_allclose(sparse, dense, atol=1e-8, rtol=0)
    shift_invert = ham.eigenvalues(k, nbands=12, sigma=0.3, solver="shift-invert")
    np.testing.assert_allclose(shift_invert, dense, atol=1e-8, rtol=0)
    # below DENSE_LIMIT 'auto' diagonalizes densely; graphene's nearest-neighbour H(k) is
    # sparse, so a larger sheet would be factorized sparsely
    assert ham.choose_solver(12, 0.3) == "dense" and ham.pair_fill() < 0.01


def test_dense_shift_invert_chosen_for_long_range_large_cells():
    """A long-range H(k) fills a sparse LU; 'auto' picks the dense factorization there."""
    rng = np.random.default_rng(4)
    n = 3100  # above DENSE_LIMIT
    ham = TBHamiltonian.from_coo(np.eye(3) * 10, n, np.zeros((n * 400, 3), int),
                                 np.repeat(np.arange(n), 400), rng.integers(0, n, n * 400),
                                 rng.normal(size=n * 400), pbc=(0, 0, 0))
    assert ham.pair_fill() > 0.1 and ham.choose_solver(6, 0.1) == "shift-invert"


def test_band_path_reuses_factorizations_and_matches_dense(monkeypatch):
    """Along a path, shift-invert keeps an earlier k-point's factorization as a Davidson
    preconditioner; the bands nearest sigma must equal dense diagonalization at every k."""
    atoms = graphene_sheet((16, 16, 1))  # 512 orbitals, disordered: many crossings near 0.3
    rng = np.random.default_rng(5)
    ham = PzTightBindingCalc(t=T, cutoff=1.6, onsite=rng.normal(0, 0.3, len(atoms))
                             ).build_hamiltonian(atoms)
    kpts = np.linspace([0, 0, 0], [0.5, 0.25, 0], 25)
    factorizations = []
    original = TBHamiltonian._shifted_inverse

    def counted(self, k, sigma):
        factorizations.append(k)
        return original(self, k, sigma)

    monkeypatch.setattr(TBHamiltonian, "_shifted_inverse", counted)
    path = ham.eigenvalues(kpts, nbands=12, sigma=0.3, solver="shift-invert")
    dense = ham.eigenvalues(kpts, nbands=12, sigma=0.3, solver="dense")
    np.testing.assert_allclose(path, dense, atol=1e-8, rtol=0)
    assert len(factorizations) <= 5  # every 10th k-point (3) plus rare fallbacks


def test_band_path_split_over_workers_matches_one_process():
    """workers=2 solves two halves of the path in forked processes: same bands, same order."""
    atoms = graphene_sheet((12, 12, 1))
    rng = np.random.default_rng(7)
    ham = PzTightBindingCalc(t=T, cutoff=1.6, onsite=rng.normal(0, 0.3, len(atoms))
                             ).build_hamiltonian(atoms)
    kpts = np.linspace([0, 0, 0], [0.5, 0.25, 0], 9)
    one, v1 = ham.eigenvalues(kpts, nbands=8, sigma=0.3, solver="shift-invert",
                              return_vectors=True)
    two, v2 = ham.eigenvalues(kpts, nbands=8, sigma=0.3, solver="shift-invert",
                              return_vectors=True, workers=2)
    assert two.shape == one.shape == (9, 8) and v2.shape == v1.shape
    np.testing.assert_allclose(two, one, atol=1e-8, rtol=0)
    np.testing.assert_allclose(two, ham.eigenvalues(kpts, nbands=8, sigma=0.3, solver="dense"),
                               atol=1e-8, rtol=0)


def test_each_solver_name_runs_its_own_solver(monkeypatch):
    """'shift-invert' and 'auto' must reach the solver they name, not a fallback."""
    atoms = graphene_sheet((4, 4, 1))
    ham = PzTightBindingCalc(t=T, cutoff=1.6).build_hamiltonian(atoms)
    called = []
    for name in ("_eig_dense", "_eig_sparse", "_eig_shift_invert"):
        original = getattr(TBHamiltonian, name)

        def spy(self, *args, _name=name, _original=original):
            called.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(TBHamiltonian, name, spy)
    for solver, expected in [("dense", "_eig_dense"), ("sparse", "_eig_sparse"),
                             ("shift-invert", "_eig_shift_invert")]:
        called.clear()
        ham.eigenvalues([[0.1, 0.2, 0.0]], nbands=4, sigma=0.3, solver=solver)
        assert called == [expected]
    called.clear()
    monkeypatch.setattr(TBHamiltonian, "choose_solver", lambda self, n, s: "shift-invert")
    ham.eigenvalues([[0.1, 0.2, 0.0]], nbands=4, sigma=0.3)
    assert called == ["_eig_shift_invert"]
    with pytest.raises(ValueError, match="unknown solver"):
        ham.eigenvalues([[0, 0, 0]], nbands=4, sigma=0.3, solver="lanczos")
    with pytest.raises(ValueError, match="needs both"):
        ham.eigenvalues([[0, 0, 0]], solver="shift-invert")


def test_generalized_problem_with_overlap():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 4))
    H = (a + a.T)[None]
    b = rng.normal(size=(4, 4)) * 0.1
    S = (np.eye(4) + (b + b.T) / 2)[None]
    ham = TBHamiltonian.from_dense(np.eye(3) * 10, [(0, 0, 0)], H, S, pbc=(0, 0, 0))
    ref = scipy.linalg.eigh(H[0], S[0], eigvals_only=True)
    np.testing.assert_allclose(ham.eigenvalues([[0, 0, 0]])[0], ref, atol=1e-12)
    np.testing.assert_allclose(ham.eigenvalues([[0, 0, 0]], nbands=2, sigma=(ref[1] + ref[2]) / 2,
                                               solver="sparse")[0], ref[1:3], atol=1e-10)
    np.testing.assert_allclose(ham.eigenvalues([[0, 0, 0]], nbands=2, sigma=(ref[1] + ref[2]) / 2,
                                               solver="shift-invert")[0], ref[1:3], atol=1e-10)


def test_hdf5_roundtrip_float32(tmp_path):
    atoms = graphene_sheet((2, 2, 1))
    ham = PzTightBindingCalc().build_hamiltonian(atoms)
    with h5py.File(tmp_path / "h.h5", "w") as f:
        ham.to_hdf5(f.create_group("ham"))
    with h5py.File(tmp_path / "h.h5", "r") as f:
        back = TBHamiltonian.from_hdf5(f["ham"])
    k = [[0.2, 0.1, 0]]
    np.testing.assert_allclose(back.eigenvalues(k), ham.eigenvalues(k), atol=1e-5)
    assert back.nelectrons == ham.nelectrons
    np.testing.assert_array_equal(back.orbital_atoms, ham.orbital_atoms)
    np.testing.assert_allclose(back.block(0, 1, (0, 0, 0)), ham.block(0, 1, (0, 0, 0)), atol=1e-6)


def test_fermi_level_counts_electrons():
    eps = np.array([[-2.0, -1.0, 1.0, 3.0]])
    mu = fermi_level(eps, None, 4.0, width=0.05)
    assert mu == pytest.approx(0.0, abs=1e-6)  # middle of the gap
    assert electron_count(eps, np.ones(1), mu, 0.05) == pytest.approx(4.0, abs=1e-8)
    with pytest.raises(Exception, match="do not fit"):
        fermi_level(eps, None, 9.0)


def test_monkhorst_pack_gamma_contains_gamma():
    k = monkhorst_pack_gamma((4, 4, 1))
    assert len(k) == 16 and np.any(np.all(k == 0, axis=1))
    assert np.all(k > -0.5 - 1e-12) and np.all(k <= 0.5 + 1e-12)
