"""Neighbour lists, species encoding, layer assignment, symmetry."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule, mx2
from ase.neighborlist import neighbor_list as ase_neighbor_list

from ase_mlks.core.errors import StructureError, UnknownElementError
from ase_mlks.core.graph import (
    assign_layers,
    interlayer_distance,
    min_distance,
    neighbor_list,
    species_index,
)
from ase_mlks.core.symmetry import irreducible_kpoints, spacegroup, standard_primitive


def _pairs(i, j, S):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


@pytest.mark.parametrize("atoms", [
    bulk("Si", "diamond", a=5.43).repeat((2, 1, 1)),
    mx2("MoS2", vacuum=8.0),
])
def test_neighbor_list_matches_ase(atoms):
    if atoms.cell[2, 2] > 10:
        atoms.pbc = (True, True, False)
    atoms.rattle(0.05, seed=1)
    nl = neighbor_list(atoms, 4.0)
    i, j, S = ase_neighbor_list("ijS", atoms, 4.0)
    assert _pairs(nl.i, nl.j, nl.shifts) == _pairs(i, j, S)
    expected = atoms.positions[nl.j] + nl.shifts @ atoms.cell - atoms.positions[nl.i]
    np.testing.assert_allclose(nl.vectors, expected, atol=1e-10)


def test_molecule_without_cell():
    nl = neighbor_list(molecule("H2O"), 1.2)
    assert len(nl) == 4


def test_zero_cell_vector_on_periodic_axis_is_rejected():
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]], pbc=True)
    with pytest.raises(StructureError, match="zero cell vector"):
        neighbor_list(atoms, 2.0)


def test_species_index_names_unknown_element():
    np.testing.assert_array_equal(species_index([42, 16, 16], [16, 42]), [1, 0, 0])
    with pytest.raises(UnknownElementError, match="W"):
        species_index([74, 16], [16, 42])


def test_assign_layers_bilayer_rattled_and_permuted():
    mono = mx2("MoS2", vacuum=0.0).repeat((3, 3, 1))
    top = mono.copy()
    top.positions[:, 2] += 6.15
    top.positions[:, :2] += [0.9, 0.3]
    bilayer = mono + top
    bilayer.cell[2, 2] = 30.0
    bilayer.pbc = (True, True, False)
    bilayer.rattle(0.1, seed=2)
    layers = assign_layers(bilayer)
    np.testing.assert_array_equal(layers, [0] * 27 + [1] * 27)
    perm = np.random.default_rng(0).permutation(len(bilayer))
    np.testing.assert_array_equal(assign_layers(bilayer[perm]), layers[perm])
    assert 1.5 < min_distance(bilayer) < 2.45


def test_interlayer_distance_of_a_bilayer():
    """Mo-Mo distance of stacked layers, whatever the atom order and the S atoms."""
    mono = mx2("MoS2", vacuum=0.0).repeat((2, 2, 1))
    top = mono.copy()
    top.positions[:, 2] += 6.15
    bilayer = mono + top
    bilayer.cell[2, 2] = 30.0
    bilayer.pbc = (True, True, False)
    assert interlayer_distance(bilayer) == pytest.approx(6.15)
    perm = np.random.default_rng(1).permutation(len(bilayer))
    assert interlayer_distance(bilayer[perm]) == pytest.approx(6.15)
    assert interlayer_distance(bilayer, number=16) == pytest.approx(6.15)


def test_symmetry_of_mos2_monolayer():
    atoms = mx2("MoS2", vacuum=8.0)
    assert spacegroup(atoms) == ("P-6m2", 187)
    k, w = irreducible_kpoints(atoms, (6, 6, 1))
    assert len(k) == 7 and w.sum() == pytest.approx(1.0)
    prim = standard_primitive(bulk("Si", cubic=True))
    assert len(prim) == 2
