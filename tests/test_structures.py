"""Structure generators: atom counts, twist angles, strain, layer separation, bad input."""

import math

import numpy as np
import pytest
from ase.neighborlist import neighbor_list

from ase_mlks.core.errors import StructureError
from ase_mlks.structures import (
    apply_inplane_strain,
    bilayer,
    bilayer_configuration,
    find_near_commensurate,
    monolayer,
    random_bilayer_configurations,
    twist_angle,
    twisted_bilayer,
    twisted_bilayer_from_vectors,
)


def min_distance(atoms):
    return neighbor_list("d", atoms, 4.0).min()


@pytest.mark.parametrize("material", ["MoS2", "MoSe2", "MoTe2", "WS2", "WSe2", "CrS2", "hBN"])
def test_monolayer(material):
    atoms = monolayer(material)
    assert tuple(atoms.pbc) == (True, True, False)
    assert len(atoms) in (2, 3)
    assert min_distance(atoms) > 1.2
    assert atoms.positions[:, 2].min() == pytest.approx(6.0)


def test_unknown_material():
    with pytest.raises(StructureError, match="unknown 2D material"):
        monolayer("Unobtainium2")


@pytest.mark.parametrize(("m", "n", "angle", "natoms"),
                         [(1, 2, 21.787, 42), (2, 3, 13.174, 114), (3, 4, 9.430, 222)])
def test_commensurate_twisted_mos2(m, n, angle, natoms):
    atoms = twisted_bilayer("MoS2", m, n)
    assert len(atoms) == natoms
    assert atoms.info["twist_angle"] == pytest.approx(angle, abs=1e-3)
    assert twist_angle(m, n) == pytest.approx(angle, abs=1e-3)
    # closed-form angle of the commensurate index
    cos = (m * m + 4 * m * n + n * n) / (2 * (m * m + m * n + n * n))
    assert math.degrees(math.acos(cos)) == pytest.approx(angle, abs=1e-3)
    assert atoms.info["strain"] == pytest.approx(0.0, abs=1e-12)
    assert atoms.info["natoms_layers"] == (natoms // 2, natoms // 2)
    # no atom overlaps across the periodic boundary (a wrong cell would put images on top)
    assert min_distance(atoms) > 2.3
    # stoichiometry per layer
    for tag in (0, 1):
        sym = np.array(atoms.get_chemical_symbols())[atoms.get_tags() == tag]
        assert (sym == "S").sum() == 2 * (sym == "Mo").sum()


def test_twisted_layer_is_rotated_copy():
    atoms = twisted_bilayer("MoS2", 1, 2)
    tags = atoms.get_tags()
    mo = np.array(atoms.get_chemical_symbols()) == "Mo"
    theta = math.radians(atoms.info["twist_angle"])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lower = atoms.positions[mo & (tags == 0), :2]
    upper = atoms.positions[mo & (tags == 1), :2]
    # rotating the bottom Mo lattice by theta about a bottom Mo atom that sits under a top Mo
    # atom (AA at origin) must land on top Mo atoms modulo the supercell
    origin = lower[0]
    rotated = (lower - origin) @ rot.T + origin
    cell = atoms.cell[:2, :2]
    inv = np.linalg.inv(cell)
    for p in rotated:
        diff = (upper - p) @ inv
        diff -= np.round(diff)
        assert np.linalg.norm(diff @ cell, axis=1).min() < 1e-6


def test_near_commensurate_paper_cells():
    cands = find_near_commensurate("MoS2", 8.95, 210, angle_tol=0.02)
    best = cands[0]
    assert sum(best.natoms_layers) == 201 and best.natoms_layers == (93, 108)
    atoms = twisted_bilayer_from_vectors("MoS2", best.v1, best.v2)
    assert len(atoms) == 201
    assert atoms.info["strain"] == pytest.approx(math.sqrt(31 / 36) - 1)
    assert min_distance(atoms) > 2.3
    big = find_near_commensurate("MoS2", 3.42, 1310, angle_tol=0.01, max_index=20)[0]
    assert big.natoms_layers == (633, 675) and big.angle == pytest.approx(3.418, abs=1e-3)


@pytest.mark.parametrize("index", [(2, 2), (0, 0), (2, 4), (-1, 2)])
def test_bad_twist_index(index):
    with pytest.raises(StructureError, match="commensurate"):
        twisted_bilayer("MoS2", *index)


def test_bilayer_stackings():
    aa = bilayer("MoS2", size=(2, 2))
    ab = bilayer("MoS2", size=(2, 2), stacking="AA'")
    assert len(aa) == len(ab) == 24
    # AA: S atoms of the two layers stacked on top of each other; AA': S over Mo
    for atoms in (aa, ab):
        assert min_distance(atoms) > 2.3
        z = atoms.positions[:, 2]
        assert z[atoms.get_tags() == 1].min() - z[atoms.get_tags() == 0].max() > 2.5
    with pytest.raises(StructureError):
        bilayer("MoS2", interlayer=3.0)


def test_bilayer_configurations_reproducible_and_varied():
    confs = random_bilayer_configurations(20, seed=3)
    again = random_bilayer_configurations(20, seed=3)
    assert all(np.allclose(a.positions, b.positions) for a, b in zip(confs, again))
    d = np.array([c.info["interlayer"] for c in confs])
    assert d.min() >= 6.15 - 0.3 and d.max() <= 6.15 + 0.7 and d.std() > 0.1
    rattled = [c.info["rattle_std"] > 0 for c in confs]
    assert 0 < sum(rattled) < 20 + 1
    shifts = np.array([c.info["shift"] for c in confs])
    assert shifts.std(axis=0).min() > 0.15  # spread over the cell
    c = bilayer_configuration(np.random.default_rng(1), rattle_probability=0.0)
    assert c.info["rattle_std"] == 0.0


def test_strained_configurations_deform_cell_and_bonds_only_in_plane():
    plain = bilayer_configuration(np.random.default_rng([0, 7]), rattle_probability=0.0)
    strained = bilayer_configuration(np.random.default_rng([0, 7]), rattle_probability=0.0,
                                     strain=0.08)
    exx, eyy, exy = strained.info["strain"]
    assert abs(exx + eyy) / 2 <= 0.08 and abs(exx - eyy) / 2 <= 0.02 and abs(exy) <= 0.02
    eps = np.array([[exx, exy], [exy, eyy]])
    # same draw up to the strain: undo it and the unstrained configuration comes back
    assert np.allclose(strained.cell[:2, :2], plain.cell[:2, :2] @ (np.eye(2) + eps).T)
    assert np.allclose(strained.positions[:, 2], plain.positions[:, 2])
    # a bond vector d maps to (1 + eps) d: check every Mo-S bond length
    i, j, S, dv = neighbor_list("ijSD", plain, 2.6)
    i2, j2, S2, dv2 = neighbor_list("ijSD", strained, 2.9)
    pairs = {(a, b, *s): d for a, b, s, d in zip(i2, j2, S2, dv2)}
    for a, b, s, d in zip(i, j, S, dv):
        expect = d.copy()
        expect[:2] = (np.eye(2) + eps) @ d[:2]
        assert np.allclose(pairs[(a, b, *s)], expect, atol=1e-9)


def test_apply_inplane_strain_rejects_non_symmetric_tensor():
    atoms = bilayer("MoS2")
    with pytest.raises(StructureError, match="symmetric"):
        apply_inplane_strain(atoms, np.array([[0.01, 0.02], [0.0, 0.01]]))


@pytest.mark.parametrize("stacking", ["AA", "AA'"])
def test_twisted_configuration_is_the_twisted_cell_with_its_top_layer_moved(stacking):
    rng = np.random.default_rng([21, 3])
    conf = bilayer_configuration(rng, twist=(1, 2), stacking=stacking, rattle_probability=0.0)
    d = conf.info["interlayer"]
    cell = twisted_bilayer("MoS2", 1, 2, interlayer=d, stacking=stacking)
    assert len(conf) == 42 and conf.info["twist"] == (1, 2)
    assert conf.info["twist_angle"] == pytest.approx(21.787, abs=1e-3)
    assert np.allclose(conf.cell[:], cell.cell[:])
    assert list(conf.get_tags()) == list(cell.get_tags())
    top = cell.get_tags() == 1
    moved = cell.positions.copy()
    moved[top, :2] += np.array(conf.info["shift"]) @ cell.cell[:2, :2]
    # equal up to lattice vectors of the twisted cell
    frac = np.linalg.solve(cell.cell[:].T, (conf.positions - moved).T).T
    assert np.allclose(frac - np.round(frac), 0.0, atol=1e-9)
    assert 6.15 - 0.3 <= d <= 6.15 + 0.7
    assert min_distance(conf) > 2.3


def test_twisted_configurations_cover_the_cell_and_repeat():
    confs = [bilayer_configuration(np.random.default_rng([21, i]), twist=(1, 2)) for i in range(12)]
    shifts = np.array([c.info["shift"] for c in confs])
    assert shifts.std(axis=0).min() > 0.15
    big = bilayer_configuration(np.random.default_rng([21, 0]), twist=(1, 2), size=(2, 1))
    assert len(big) == 84 and np.bincount(big.get_tags()).tolist() == [42, 42]
    with pytest.raises(StructureError, match="no commensurate twisted cell"):
        bilayer_configuration(np.random.default_rng(0), twist=(2, 2))
