"""HamiltonianCalculator: the GPAW-like electronic API and ASE band structures."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from ase.build import graphene
from ase.dft.kpoints import BandPath
from ase.spectrum.band_structure import BandStructure

from ase_mlks.testing import PzTightBindingCalc


@pytest.fixture
def sheet():
    atoms = graphene(a=2.46, vacuum=8.0)
    atoms.pbc = (True, True, False)
    return atoms


def test_band_structure_through_ase_bandpath_and_plot(sheet, tmp_path):
    sheet.calc = PzTightBindingCalc(kpts=(12, 12, 1))
    path = sheet.cell.bandpath("GMKG", npoints=60, pbc=sheet.pbc)
    bs = sheet.calc.band_structure(path=path)
    assert isinstance(bs, BandStructure)
    assert bs.energies.shape == (1, 60, 2)
    assert bs.reference == pytest.approx(0.0, abs=1e-6)  # half filling of a symmetric model
    k_index = int(np.argmin(np.linalg.norm(path.kpts - path.special_points["K"], axis=1)))
    assert np.abs(bs.energies[0, k_index]).max() < 1e-8  # Dirac point
    ax = bs.plot(emin=-10, emax=10, filename=str(tmp_path / "bands.png"))
    assert ax is not None and (tmp_path / "bands.png").stat().st_size > 1000


def test_band_structure_from_string_and_from_kpts_parameter(sheet):
    calc = PzTightBindingCalc(kpts=(6, 6, 1))
    sheet.calc = calc
    bs1 = calc.band_structure("GMKG", npoints=30)
    calc.set(kpts=sheet.cell.bandpath("GMKG", npoints=30, pbc=sheet.pbc))
    bs2 = calc.band_structure()
    np.testing.assert_allclose(bs1.energies, bs2.energies, atol=1e-12)
    explicit = BandPath(sheet.cell, kpts=np.array([[0, 0, 0], [0.5, 0, 0]]))
    bs3 = calc.band_structure(path=explicit)
    assert bs3.energies.shape == (1, 2, 2)


def test_gpaw_like_api(sheet):
    sheet.calc = PzTightBindingCalc(kpts=(6, 6, 1))
    calc = sheet.calc
    k = calc.get_ibz_k_points()
    w = calc.get_k_point_weights()
    assert k.shape[1] == 3 and len(k) < 36 and w.sum() == pytest.approx(1.0)
    assert calc.get_number_of_spins() == 1
    assert calc.get_number_of_bands() == 2
    e0 = calc.get_eigenvalues(kpt=0, spin=0)
    np.testing.assert_allclose(e0, [-8.1, 8.1], atol=1e-10)  # Γ: ±3|t|
    assert calc.get_fermi_level() == pytest.approx(0.0, abs=1e-6)
    energies, dos = calc.get_dos(width=0.2)
    assert np.trapezoid(dos, energies) == pytest.approx(4.0, rel=1e-3)  # 2 bands x 2 spins
    with pytest.raises(IndexError):
        calc.get_eigenvalues(0, spin=1)


def test_caching_follows_ase_check_state(sheet):
    calc = PzTightBindingCalc(kpts=(3, 3, 1))
    sheet.calc = calc
    h1 = calc.get_hamiltonian(sheet)
    assert calc.get_hamiltonian(sheet) is h1  # unchanged atoms: cached
    calc.set(kpts=(4, 4, 1))
    assert calc.get_hamiltonian(sheet) is h1  # k-points do not change H(R)
    sheet.positions[0, 0] += 0.05
    assert calc.get_hamiltonian(sheet) is not h1
    e = sheet.get_potential_energy()
    assert sheet.calc.results["free_energy"] == e


def test_ibz_and_full_mesh_give_same_band_energy(sheet):
    full = PzTightBindingCalc(kpts={"size": (9, 9, 1), "symmetry": False})
    ibz = PzTightBindingCalc(kpts=(9, 9, 1))
    sheet.calc = full
    e_full = sheet.get_potential_energy()
    sheet.calc = ibz
    assert sheet.get_potential_energy() == pytest.approx(e_full, abs=1e-9)


def test_large_cells_use_gamma_midgap_and_bands_near_the_fermi_level(monkeypatch):
    """Above DENSE_LIMIT orbitals: Fermi level from the Γ gap, 20 bands by shift-invert."""
    import ase_mlks.core.calculator as calculator_module
    import ase_mlks.core.hamiltonian as hamiltonian_module

    monkeypatch.setattr(calculator_module, "DENSE_LIMIT", 100)
    monkeypatch.setattr(hamiltonian_module, "DENSE_LIMIT", 100)
    atoms = graphene(a=2.46, vacuum=5.0).repeat((8, 8, 1))  # 128 orbitals; K not folded to Γ
    atoms.pbc = (True, True, False)
    rng = np.random.default_rng(0)
    atoms.calc = PzTightBindingCalc(t=-2.7, cutoff=1.6,
                                    onsite=np.where(np.arange(len(atoms)) % 2, 0.5, -0.5)
                                    + rng.normal(0, 0.01, len(atoms)))
    ham = atoms.calc.get_hamiltonian(atoms)
    eg = np.linalg.eigvalsh(ham.hk(np.zeros(3)))
    nocc = len(atoms) // 2
    assert atoms.calc.get_fermi_level() == pytest.approx(0.5 * (eg[nocc - 1] + eg[nocc]))
    path = atoms.cell.bandpath("GMKG", npoints=5, pbc=atoms.pbc)
    bs = atoms.calc.band_structure(path)
    assert bs.energies.shape == (1, 5, calculator_module.LARGE_CELL_NBANDS)
    full = ham.eigenvalues(path.kpts)
    for e_near, e_all in zip(bs.energies[0], full):
        ref = np.sort(e_all[np.argsort(np.abs(e_all - bs.reference))[:20]])
        np.testing.assert_allclose(e_near, ref, atol=1e-8)


def test_cell_choice_invariance_of_the_analytic_model():
    """The reusable check passes for an exact model and catches a cell-dependent one."""
    from ase.build import graphene

    from ase_mlks.testing import assert_cell_choice_invariant

    atoms = graphene(a=2.46, vacuum=5.0)
    atoms.pbc = True
    atoms.rattle(0.05, seed=1)
    make = lambda: PzTightBindingCalc(cutoff=3.0)  # noqa: E731
    errors = assert_cell_choice_invariant(make, atoms, forces=False)
    assert max(errors.values()) < 1e-10
    # an on-site level that follows the atom index is not a property of the crystal
    class IndexedOnsite(PzTightBindingCalc):
        def build_hamiltonian(self, atoms):
            self.parameters["onsite"] = 0.3 * np.arange(len(atoms))
            return super().build_hamiltonian(atoms)

    with pytest.raises(AssertionError, match="cell choice"):
        assert_cell_choice_invariant(lambda: IndexedOnsite(cutoff=3.0), atoms, forces=False)
