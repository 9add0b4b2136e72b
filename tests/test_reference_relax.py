"""GPAW(+D3) relaxation of stored structures: storage (fast, no GPAW) and a resumed run (slow)."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from ase_mlks.core.dataset import StructureDataset
from ase_mlks.core.errors import AseMlksError
from ase_mlks.reference.relax import (
    RelaxResult,
    relax_structure,
    relaxed_positions_of,
    scan_attribute,
    store_interlayer_scan,
    store_relaxation,
)
from ase_mlks.reference.settings import FAST

DATA = Path(__file__).parent / "data"


def _result(n: int, shift: float = 0.01) -> RelaxResult:
    pos = np.arange(3 * n, dtype=float).reshape(n, 3) * 0.1 + shift
    return RelaxResult(positions=pos, energy=-1.5, steps=7, fmax=0.02, cpu_time=3.0,
                       converged=True)


def test_store_relaxation_adds_the_relaxed_geometry_and_keeps_the_record(tmp_path):
    path = tmp_path / "mono.h5"
    shutil.copyfile(DATA / "mos2_monolayer.h5", path)
    with StructureDataset(path, "r") as ds:
        before = ds.read("monolayer_MoS2")
    res = _result(len(before["atoms"]))
    store_relaxation(path, "monolayer_MoS2", res, FAST, 0.05, command="test")
    with StructureDataset(path, "r") as ds:
        after = ds.read("monolayer_MoS2")
    np.testing.assert_array_equal(after["relaxed_positions"], res.positions)  # float64 kept
    assert float(after["relaxed_energy"]) == -1.5
    meta = json.loads(after["attrs"]["relaxation"])
    assert meta["steps"] == 7 and meta["fmax_target"] == 0.05 and meta["settings"]["h"] == 0.25
    for name, value in before.items():  # nothing else changed
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[name], value)
    # storing again replaces the relaxation instead of failing
    store_relaxation(path, "monolayer_MoS2", _result(len(res.positions), 0.5), FAST, 0.05)
    with StructureDataset(path, "r") as ds:
        assert ds.read("monolayer_MoS2")["relaxed_positions"][0, 0] == pytest.approx(0.5)


def test_store_interlayer_scan_keeps_one_summary_per_grid(tmp_path):
    """A scan's summary goes into the record under its grid's name; another grid's scan
    does not replace it; a missing record is an error and leaves the file as it was."""
    path = tmp_path / "mono.h5"
    shutil.copyfile(DATA / "mos2_monolayer.h5", path)
    store_interlayer_scan(path, "monolayer_MoS2", {"h": 0.15, "zero_force_mo_mo": 6.3})
    store_interlayer_scan(path, "monolayer_MoS2", {"h": 0.2, "zero_force_mo_mo": 6.25})
    with StructureDataset(path, "r") as ds:
        attrs = ds.read("monolayer_MoS2")["attrs"]
    assert scan_attribute(0.15) == "interlayer_scan_h0.15"
    assert json.loads(attrs[scan_attribute(0.15)])["zero_force_mo_mo"] == 6.3
    assert json.loads(attrs[scan_attribute(0.2)])["zero_force_mo_mo"] == 6.25
    before = path.read_bytes()
    with pytest.raises(AseMlksError, match="no record"):
        store_interlayer_scan(path, "nothing", {"h": 0.15, "zero_force_mo_mo": 1.0})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".mono.h5.*"))  # no temporary file left behind


def test_layer_net_forces_sum_each_layers_z_forces():
    """The rigid interlayer coordinate's force: a per-atom fmax hides it in large cells."""
    from ase_mlks.core.graph import layer_net_forces

    with StructureDataset(DATA / "mos2_bilayer_2x2.h5", "r") as ds:
        rec = ds.read("bl00001")
    atoms = rec["atoms"]
    forces = np.zeros((len(atoms), 3))
    top = atoms.positions[:, 2] > atoms.positions[:, 2].mean()
    forces[top, 2] = 0.006  # under any per-atom fmax, yet 0.072 eV/Å on the layer
    forces[:, 0] = 1.0  # in-plane forces do not count
    net = layer_net_forces(atoms, forces)
    assert net == pytest.approx([0.0, 0.006 * top.sum()])
    assert layer_net_forces(atoms, rec["forces"]) == pytest.approx(
        [rec["forces"][~top, 2].sum(), rec["forces"][top, 2].sum()])


def test_store_relaxation_refuses_a_wrong_record_and_leaves_the_file_intact(tmp_path):
    path = tmp_path / "mono.h5"
    shutil.copyfile(DATA / "mos2_monolayer.h5", path)
    original = path.read_bytes()
    with pytest.raises(AseMlksError, match="atoms"):
        store_relaxation(path, "monolayer_MoS2", _result(5), FAST, 0.05)
    with pytest.raises(AseMlksError, match="no record"):
        store_relaxation(path, "nope", _result(3), FAST, 0.05)
    assert path.read_bytes() == original


@pytest.mark.parametrize("fixture, key", [("mos2_twisted_1_2.h5", "twisted_MoS2_1_2"),
                                          ("mos2_twisted_1_2_aap.h5", "twisted_MoS2_1_2_AAp"),
                                          ("mos2_twisted_2_3.h5", "twisted_MoS2_2_3")])
def test_relaxed_twisted_fixture_is_consistent(fixture, key):
    """When a twisted fixture holds a GPAW relaxation, it belongs to that structure."""
    with h5py.File(DATA / fixture) as f:
        g = f[key]
        if "relaxed_positions" not in g:
            pytest.skip("fixture has no GPAW relaxation yet")
        pos, rel = g["positions"][()], g["relaxed_positions"][()]
        meta = json.loads(g.attrs["relaxation"])
    assert rel.shape == pos.shape
    assert meta["converged"] and meta["fmax"] <= meta["fmax_target"]
    # a relaxation moves atoms by tenths of an Å, not by bond lengths
    assert np.abs(rel - pos).max() < 0.5


@pytest.mark.slow
def test_relaxation_resumes_from_its_workdir(tmp_path):
    pytest.importorskip("gpaw")
    with StructureDataset(DATA / "mos2_monolayer.h5", "r") as ds:
        atoms = ds.read_atoms("monolayer_MoS2")
    atoms.positions[0, 2] += 0.05  # push Mo out of the S-S midplane
    settings = FAST.with_kpts((2, 2))
    first = relax_structure(atoms, tmp_path, settings, fmax=1e-4, steps=1)
    assert not first.converged and first.steps == 1
    second = relax_structure(atoms, tmp_path, settings, fmax=1e-4, steps=1)
    assert second.steps == 2
    from ase.io import read

    images = read(str(tmp_path / "relax.traj"), ":")
    # the resumed run started where the first one stopped, not from the input geometry
    np.testing.assert_allclose(images[2].positions, first.positions, atol=1e-10)
    assert np.abs(first.positions - atoms.positions).max() > 1e-4
    with pytest.raises(AseMlksError, match="another structure"):
        relax_structure(atoms[:2], tmp_path, settings, steps=1)


def test_kconverged_twisted_fixture_matches_the_gamma_only_fixtures():
    """tests/data/mos2_twisted_kconv.h5 holds the twisted fixtures' cells on a denser k-grid:
    the same atoms and the same settings but k, so the benchmark compares like with like."""
    kconv = DATA / "mos2_twisted_kconv.h5"
    with StructureDataset(kconv, "r") as ds:
        keys = ds.keys()
        dense = {k: ds.read(k) for k in keys}
    assert keys, "no records in the k-converged fixture"
    gamma_files = {}  # record name -> the Γ-only fixture that holds it
    for path in sorted(DATA.glob("mos2_twisted_*.h5")):
        if path != kconv:
            with StructureDataset(path, "r") as ds:
                gamma_files.update(dict.fromkeys(ds.keys(), path))
    for key, rec in dense.items():
        assert key in gamma_files, f"{key} has no Γ-only fixture"
        with StructureDataset(gamma_files[key], "r") as ds:
            gamma = ds.read(key)
        np.testing.assert_allclose(rec["positions"], gamma["positions"], atol=1e-9)
        np.testing.assert_allclose(rec["cell"], gamma["cell"], atol=1e-9)
        assert list(rec["numbers"]) == list(gamma["numbers"])
        s_dense = json.loads(rec["attrs"]["settings"])
        s_gamma = json.loads(gamma["attrs"]["settings"])
        assert s_gamma["kpts"] == [1, 1] and min(s_dense["kpts"]) >= 2
        assert {k: v for k, v in s_dense.items() if k != "kpts"} == \
            {k: v for k, v in s_gamma.items() if k != "kpts"}


def test_relax_start_from_takes_another_records_relaxed_positions(tmp_path):
    """`relax --start-from FILE` begins at FILE's relaxed geometry of the same structure,
    and refuses a file without a relaxation or with other atoms."""
    path = tmp_path / "mono.h5"
    shutil.copyfile(DATA / "mos2_monolayer.h5", path)
    with StructureDataset(path, "r") as ds:
        atoms = ds.read("monolayer_MoS2")["atoms"]
    with pytest.raises(AseMlksError, match="no GPAW relaxation"):
        relaxed_positions_of(str(path), "monolayer_MoS2", atoms)
    res = _result(len(atoms))
    store_relaxation(path, "monolayer_MoS2", res, FAST, 0.05, command="test")
    np.testing.assert_array_equal(relaxed_positions_of(str(path), "monolayer_MoS2", atoms),
                                  res.positions)
    with pytest.raises(AseMlksError, match="another structure"):
        relaxed_positions_of(str(path), "monolayer_MoS2", atoms.repeat((2, 1, 1)))
    with pytest.raises(AseMlksError, match="no record"):
        relaxed_positions_of(str(path), "nope", atoms)
