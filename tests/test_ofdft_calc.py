"""solve() API and OFDFTCalc on the shipped models: shapes, units, forces = -dE/dR, errors."""

import numpy as np
import pytest
from ase import Atoms
from ase.units import Bohr, Hartree

from ase_mlks.core.errors import AseMlksError, StructureError
from ase_mlks.ofdft import OFDFTCalc, solve
from ase_mlks.ofdft.calculator import hellmann_feynman_forces, scatterer_potential
from ase_mlks.ofdft.data import gauss3d_from_params, get_testbed, ground_state


def _scatterers(seed: int = 0, n: int = 10) -> Atoms:
    rng = np.random.default_rng(seed)
    return Atoms(f"X{n}", scaled_positions=rng.random((n, 3)), cell=np.eye(3) * Bohr,
                 pbc=True, charges=rng.uniform(0, 2, n))


@pytest.mark.parametrize("name", ["gauss1d", "speckle1d", "gauss3d"])
def test_solve_api_on_shipped_models(name):
    tb = get_testbed(name)
    v = tb.sample(123, 0)
    r = solve(v, model=name, steps=60)
    assert r.density.shape == v.shape
    assert r.density.min() > 0
    assert r.density.sum() * tb.dv == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(r.energy) and r.latent.ndim == 1 and 0 < r.steps <= 60
    batch = solve(np.stack([v, tb.sample(123, 1)]), model=name, steps=5)
    assert len(batch) == 2 and batch[1].density.shape == v.shape
    with pytest.raises(ValueError, match="grid"):
        solve(np.zeros(7), model=name)


def test_potential_of_atoms_matches_testbed_definition():
    atoms = _scatterers(1)
    v, centres, amps = scatterer_potential(atoms)
    ref = gauss3d_from_params(atoms.get_initial_charges(), atoms.get_scaled_positions(),
                              get_testbed("gauss3d").coordinates())
    assert np.allclose(v, ref)
    assert np.all((centres >= 0) & (centres < 1))


def test_hellmann_feynman_is_derivative_of_potential_energy():
    # at fixed density, -d/dR int n V(R) equals the analytic expression
    atoms = _scatterers(2, n=3)
    v, centres, amps = scatterer_potential(atoms)
    tb = get_testbed("gauss3d")
    _, n = ground_state(tb, v)
    f = hellmann_feynman_forces(n, centres, amps)
    h = 1e-5
    for i, k in [(0, 0), (1, 2), (2, 1)]:
        c_p, c_m = centres.copy(), centres.copy()
        c_p[i, k] += h
        c_m[i, k] -= h
        e_p = (n * gauss3d_from_params(amps, c_p, tb.coordinates())).sum() * tb.dv
        e_m = (n * gauss3d_from_params(amps, c_m, tb.coordinates())).sum() * tb.dv
        assert f[i, k] == pytest.approx(-(e_p - e_m) / (2 * h), rel=1e-6, abs=1e-9)


def test_exact_forces_are_minus_energy_gradient():
    # Hellmann-Feynman with the exact ground state reproduces finite differences of e_gs
    atoms = _scatterers(3, n=4)
    tb = get_testbed("gauss3d")
    v, centres, amps = scatterer_potential(atoms)
    _, n = ground_state(tb, v)
    f = hellmann_feynman_forces(n, centres, amps)
    h = 1e-4
    c_p, c_m = centres.copy(), centres.copy()
    c_p[1, 0] += h
    c_m[1, 0] -= h
    e_p, _ = ground_state(tb, gauss3d_from_params(amps, c_p, tb.coordinates()))
    e_m, _ = ground_state(tb, gauss3d_from_params(amps, c_m, tb.coordinates()))
    assert f[1, 0] == pytest.approx(-(e_p - e_m) / (2 * h), rel=1e-5, abs=1e-8)


def test_calculator_energy_forces_density_units():
    atoms = _scatterers(4)
    calc = OFDFTCalc()  # shipped gauss3d
    atoms.calc = calc
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    assert f.shape == (10, 3) and np.all(np.isfinite(f))
    n = calc.get_density()
    assert n.shape == (18, 18, 18)
    assert n.sum() * (Bohr / 18) ** 3 == pytest.approx(1.0, abs=1e-5)  # 1/Angstrom^3
    # the energy lies within the range of the exact problem: mean V within [min V, max V]
    v, _, _ = scatterer_potential(atoms)
    assert v.min() * Hartree < e < v.max() * Hartree
    # translating every scatterer by a whole grid step changes nothing
    moved = atoms.copy()
    moved.translate(np.full(3, Bohr / 18 * 2))
    moved.calc = OFDFTCalc()
    assert moved.get_potential_energy() == pytest.approx(e, abs=1.6e-3 * Hartree)  # chem. acc.


def test_calculator_forces_match_finite_differences():
    atoms = _scatterers(5)
    atoms.calc = OFDFTCalc(warm_start=True)
    atoms.get_potential_energy()
    f = atoms.get_forces()
    h = 2e-3  # Angstrom
    for i, k in [(0, 0), (3, 2)]:
        p = atoms.get_positions()
        p[i, k] += h
        atoms.set_positions(p)
        e_p = atoms.get_potential_energy()
        p[i, k] -= 2 * h
        atoms.set_positions(p)
        e_m = atoms.get_potential_energy()
        p[i, k] += h
        atoms.set_positions(p)
        fd = -(e_p - e_m) / (2 * h)
        assert f[i, k] == pytest.approx(fd, abs=0.02 * np.abs(f).max() + 1e-3)


def test_calculator_rejects_bad_input():
    calc = OFDFTCalc()
    atoms = _scatterers(6)
    atoms.set_cell(np.eye(3) * 2.0, scale_atoms=True)
    atoms.calc = calc
    with pytest.raises(StructureError, match="1 Bohr"):
        atoms.get_potential_energy()
    atoms = _scatterers(6)
    atoms.pbc = [True, True, False]
    atoms.calc = calc
    with pytest.raises(StructureError, match="periodic"):
        atoms.get_potential_energy()
    atoms = _scatterers(6)
    atoms.set_initial_charges(np.full(10, 3.0))
    atoms.calc = calc
    with pytest.raises(StructureError, match="amplitudes"):
        atoms.get_potential_energy()
    with pytest.raises(AseMlksError, match="3D"):
        OFDFTCalc(model="gauss1d")
