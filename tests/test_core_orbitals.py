"""Real-SH order and Wigner-D matrices: rotating a structure rotates H blocks by D_i H D_j^T."""

import numpy as np
import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from ase_mlks.core.errors import UnknownElementError
from ase_mlks.core.orbitals import OrbitalBasis, e3nn_to_ours, pyscf_to_ours, wigner_D
from ase_mlks.testing import random_rotation

SQ3 = np.sqrt(3.0)


def slater_koster_sd(u: np.ndarray) -> np.ndarray:
    """Slater–Koster s-d block (V_sdσ = 1) for bond direction u = (l, m, n), our d order."""
    l, m, n = u
    return np.array([SQ3 * l * m, SQ3 * m * n, n * n - (l * l + m * m) / 2, SQ3 * l * n,
                     SQ3 / 2 * (l * l - m * m)])


def slater_koster_pp(u: np.ndarray, sigma=1.3, pi=-0.4) -> np.ndarray:
    """Slater–Koster p-p block in our p order (y, z, x)."""
    v = u[[1, 2, 0]]
    return sigma * np.outer(v, v) + pi * (np.eye(3) - np.outer(v, v))


@pytest.mark.parametrize("seed", range(4))
def test_slater_koster_blocks_rotate_with_wigner_D(seed):
    """Independent textbook formulas fix our order and signs of the real orbitals."""
    R = random_rotation(seed)
    u = np.random.default_rng(seed + 10).normal(size=3)
    u /= np.linalg.norm(u)
    np.testing.assert_allclose(slater_koster_sd(R @ u), wigner_D(2, R) @ slater_koster_sd(u),
                               atol=1e-12)
    D1 = wigner_D(1, R)
    np.testing.assert_allclose(slater_koster_pp(R @ u), D1 @ slater_koster_pp(u) @ D1.T,
                               atol=1e-12)
    np.testing.assert_allclose(wigner_D(1, R), R[[1, 2, 0]][:, [1, 2, 0]], atol=1e-12)


def test_e3nn_equivariance_utility_on_our_d_functions():
    """e3nn's own checker: our d functions mapped back to e3nn order transform as 2e."""
    P = torch.from_numpy(e3nn_to_ours(2))

    def sd_block(x):
        return torch.stack([torch.from_numpy(slater_koster_sd(v / np.linalg.norm(v)))
                            for v in x.double().numpy()]) @ P.to(torch.float64)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn draws its random rotations in this dtype
    try:
        assert_equivariant(sd_block, irreps_in=[o3.Irreps("1o")], irreps_out=[o3.Irreps("2e")],
                           args_in=[torch.randn(6, 3, dtype=torch.float64)], tolerance=1e-9)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("l", range(4))
def test_wigner_D_is_a_representation(l):
    A, B = random_rotation(1), random_rotation(2)
    np.testing.assert_allclose(wigner_D(l, A @ B), wigner_D(l, A) @ wigner_D(l, B), atol=1e-12)
    D = wigner_D(l, A)
    np.testing.assert_allclose(D @ D.T, np.eye(2 * l + 1), atol=1e-12)


def test_basis_layout_and_errors():
    basis = OrbitalBasis({"Mo": "4d", "S": "3p"})
    numbers = [42, 16, 16]
    assert basis.total_norb(numbers) == 11
    np.testing.assert_array_equal(basis.orbital_offsets(numbers), [0, 5, 8, 11])
    assert basis.labels("S") == ["3py", "3pz", "3px"]
    assert str(basis.irreps("Mo")) == "1x2e"
    assert OrbitalBasis(basis.to_dict()) == basis
    with pytest.raises(UnknownElementError, match="W"):
        basis.norb("W")
    rot = basis.structure_rotation(numbers, random_rotation(3))
    assert rot.shape == (11, 11)
    np.testing.assert_allclose(rot @ rot.T, np.eye(11), atol=1e-12)


def test_pyscf_p_order_conversion():
    p = pyscf_to_ours(1)
    np.testing.assert_array_equal(p @ np.array([1.0, 2.0, 3.0]), [2.0, 3.0, 1.0])
    np.testing.assert_array_equal(pyscf_to_ours(2), np.eye(5))
