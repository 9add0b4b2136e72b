"""Physics of the OF-DFT testbed generators and exact diagonalization (fast)."""

import numpy as np
import pytest
import scipy.linalg as sla
from scipy.special import erf

from ase_mlks.ofdft.data import (
    cubic_testbed,
    exact_functional,
    fd_second_derivative_coefficients,
    gauss3d_from_params,
    generate_dataset,
    get_testbed,
    ground_state,
    laplacian_1d,
    load_dataset,
)


@pytest.mark.parametrize("m", [1, 2, 4, 5])
def test_fd_coefficients_exact_on_polynomials(m):
    c = fd_second_derivative_coefficients(m)
    k = np.arange(1, m + 1)
    # sum_k c_k (k^p + (-k)^p) reproduces d^2/dx^2 x^p at 0: 2 for p = 2, 0 for other even p
    for p in range(0, 2 * m + 1, 2):
        val = (c[0] if p == 0 else 0.0) + np.sum(c[1:] * 2 * k.astype(float) ** p)
        assert val == pytest.approx(2.0 if p == 2 else 0.0, abs=1e-9)
    if m == 1:
        assert np.allclose(c, [-2, 1])


def test_particle_in_box_levels():
    tb = get_testbed("gauss1d")
    e, n = ground_state(tb, np.zeros(tb.shape))
    assert e == pytest.approx(np.pi**2 / 2, rel=1e-9)  # E0 units, L = 1 a0
    assert n.sum() * tb.dv == pytest.approx(1.0)
    x = tb.coordinates()
    assert np.allclose(n, 2 * np.sin(np.pi * x) ** 2, atol=1e-6)
    levels = sla.eigvalsh(tb.kinetic().toarray())[:4]
    assert np.allclose(levels, np.pi**2 / 2 * np.arange(1, 5) ** 2, rtol=1e-7)


def test_kinetic_symmetric_and_hard_wall_reflection():
    d = laplacian_1d(12, 0.1, 4, periodic=False).toarray()
    assert np.allclose(d, d.T)
    p = laplacian_1d(12, 0.1, 5, periodic=True).toarray()
    assert np.allclose(p, p.T) and np.allclose(p.sum(1), 0)


def test_harmonic_oscillator_in_periodic_box():
    tb = get_testbed("speckle1d")  # L = 14 a0, wide enough for a Gaussian of width ~1
    x = tb.coordinates()
    omega = 2.0
    e, n = ground_state(tb, 0.5 * omega**2 * (x - 7.0) ** 2)
    assert e == pytest.approx(omega / 2, rel=1e-6)
    exact = np.sqrt(omega / np.pi) * np.exp(-omega * (x - 7.0) ** 2)
    assert np.abs(n - exact).sum() * tb.dx < 1e-5


def test_3d_separable_potential_matches_1d_problem():
    tb = get_testbed("gauss3d")
    x = tb.coordinates()
    v1 = 0.8 * np.cos(2 * np.pi * x) + 0.3 * np.sin(4 * np.pi * x)
    v = v1[:, None, None] + v1[None, :, None] + v1[None, None, :]
    e3, n3 = ground_state(tb, v)
    h1 = -0.5 * laplacian_1d(18, tb.dx, 5, True).toarray() + np.diag(v1)
    w, u = sla.eigh(h1)
    assert e3 == pytest.approx(3 * w[0], abs=1e-8)
    n1 = u[:, 0] ** 2 / (u[:, 0] ** 2).sum() / tb.dx
    assert np.allclose(n3, n1[:, None, None] * n1[None, :, None] * n1[None, None, :], atol=1e-6)
    # constant potential: uniform density, e = V
    e0, n0 = ground_state(tb, np.full(tb.shape, 0.7))
    assert e0 == pytest.approx(0.7, abs=1e-9) and np.allclose(n0, 1.0)


def test_functional_label_is_kinetic_energy_of_sqrt_density():
    for name in ("gauss1d", "speckle1d", "gauss3d"):
        tb = get_testbed(name)
        v = tb.sample(7, 0)
        e, n = ground_state(tb, v)
        f = e - (v * n).sum() * tb.dv
        assert f == pytest.approx(exact_functional(tb, n), rel=1e-7, abs=1e-10)
        assert f > 0 and n.min() >= 0


def test_speckle_statistics():
    tb = get_testbed("speckle1d")
    v = np.stack([tb.sample(3, i) for i in range(600)])
    assert v.min() >= 0
    assert v.mean() == pytest.approx(0.25, rel=0.05)  # V0
    assert (v > 0.75).mean() == pytest.approx(np.exp(-3), rel=0.2)  # P(V) = exp(-V/V0)/V0
    # intensity autocorrelation sinc^2(pi x): 1 at x = 0, 0 at x = a0, 0.405 at x = a0/2
    def corr(shift):
        return np.mean(v * np.roll(v, shift, axis=1)) / v.mean() ** 2 - 1

    step = round(1.0 / tb.dx)  # ~ one correlation length
    assert corr(0) == pytest.approx(1.0, abs=0.1)
    assert abs(corr(step)) < 0.1


def test_gauss3d_potential_normalization_and_min_image():
    tb = get_testbed("gauss3d")
    a = np.array([1.3, 0.4])
    c = np.array([[0.5, 0.5, 0.5], [0.02, 0.97, 0.5]])
    v = gauss3d_from_params(a, c, tb.coordinates())
    # each normalized Gaussian integrates to A_i / 10 times the weight inside the minimum-image
    # cube |d| < L/2 = 3 sigma per axis, erf(3 / sqrt 2)^3 (grid sum of the cut tails: ~1e-3)
    assert v.sum() * tb.dv == pytest.approx(a.sum() / 10 * erf(3 / np.sqrt(2)) ** 3, rel=2e-3)
    # periodicity: a centre shifted by a lattice vector gives the same potential
    v2 = gauss3d_from_params(a, c + np.array([1.0, -1.0, 2.0]), tb.coordinates())
    assert np.allclose(v, v2)
    # a translation by whole grid steps rolls the ground state
    v3 = gauss3d_from_params(a, c + 3 / 18, tb.coordinates())
    e, n = ground_state(tb, v)
    e3, n3 = ground_state(tb, v3)
    assert e3 == pytest.approx(e, abs=1e-9)
    assert np.allclose(np.roll(n, 3, axis=(0, 1, 2)), n3, atol=1e-7)


def test_dataset_deterministic_and_resumable(tmp_path):
    d = generate_dataset("gauss1d", tmp_path / "a", 5, seed=4, chunk=2, progress=False)
    first = load_dataset(d)
    assert first["density"].shape == (5, 256) and first["density"].dtype == np.float32
    assert np.allclose(first["density"].sum(1) * get_testbed("gauss1d").dv, 1, atol=1e-5)
    (d / "part-0000002.h5").unlink()  # simulate a run killed mid-way
    generate_dataset("gauss1d", d, 5, seed=4, chunk=2, progress=False)
    again = load_dataset(d)
    assert np.array_equal(first["energy"], again["energy"])
    other = generate_dataset("gauss1d", tmp_path / "b", 2, seed=4, chunk=2, progress=False)
    assert np.array_equal(load_dataset(other)["potential"], first["potential"][:2])


def test_unknown_testbed_and_bad_shape():
    with pytest.raises(ValueError, match="unknown OF-DFT testbed"):
        get_testbed("speckle3d")
    with pytest.raises(ValueError, match="shape"):
        ground_state(get_testbed("gauss1d"), np.zeros(100))
    assert cubic_testbed(8).shape == (8, 8, 8)
