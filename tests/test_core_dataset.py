"""HDF5 structure datasets: append, resume, read, split, torch view."""

import numpy as np
import pytest
from ase.build import molecule

from ase_mlks.core.dataset import StructureDataset, TorchStructureDataset


def test_append_resume_read(tmp_path):
    path = tmp_path / "d.h5"
    with StructureDataset(path) as ds:
        for n in range(5):
            atoms = molecule("H2O")
            atoms.rattle(0.01, seed=n)
            assert ds.append(f"s{n}", atoms, energy=np.array(-n * 1.0),
                             forces=np.zeros((3, 3)), metadata={"settings": {"xc": "PBE"}})
        assert not ds.append("s0", molecule("H2O"))  # resumable: skipped
    with StructureDataset(path, "r") as ds:
        assert len(ds) == 5 and "s3" in ds
        rec = ds.read("s3")
        assert rec["energy"] == -3.0 and rec["forces"].dtype == np.float32
        assert rec["atoms"].get_chemical_formula() == "H2O"
        assert '"PBE"' in rec["attrs"]["settings"]
        train, test = ds.split(0.8, seed=0)
        assert len(train) == 4 and len(test) == 1 and not set(train) & set(test)


def test_incomplete_group_is_replaced(tmp_path):
    path = tmp_path / "d.h5"
    with StructureDataset(path) as ds:
        ds._file.create_group("broken")  # what a crash mid-write leaves behind
        assert "broken" not in ds
        assert ds.append("broken", molecule("H2"), energy=np.array(1.0))
        assert "broken" in ds


def test_torch_view(tmp_path):
    path = tmp_path / "d.h5"
    with StructureDataset(path) as ds:
        for n in range(3):
            ds.append(f"s{n}", molecule("CH4"), energy=np.array(float(n)))
    view = TorchStructureDataset(path, transform=lambda r: float(r["energy"]))
    assert len(view) == 3 and sorted(view[i] for i in range(3)) == [0.0, 1.0, 2.0]


def _contents(path):
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = dict(f.attrs)

        def visit(name, obj):
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                     for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj[()].tobytes() if obj.shape else obj[()], attrs)
            else:
                out[name] = attrs

        f.visititems(visit)
    return out


def test_repack_keeps_every_value_and_shrinks_small_records(tmp_path):
    import h5py

    from ase_mlks.core.io import repack_hdf5

    path = tmp_path / "d.h5"
    # the old layout: every array chunked and gzip-compressed, however small
    with h5py.File(path, "w") as f:
        f.attrs["version"] = 3
        for n in range(6):
            g = f.create_group(f"s{n}")
            g.attrs["settings"] = '{"xc": "PBE"}'
            g.create_dataset("energy", data=np.float32(-n))
            g.create_dataset("forces", data=np.random.default_rng(n).normal(size=(24, 3))
                             .astype(np.float32), compression="gzip", shuffle=True)
            g.create_dataset("positions", data=np.arange(72.0).reshape(24, 3),
                             compression="gzip", shuffle=True)
            g.create_dataset("big", data=np.linspace(0, 1, 1500, dtype=np.float32),
                             compression="gzip", shuffle=True)
        del f["s5"]  # a deleted record leaves free space behind
    before = _contents(path)
    size_before, size_after = repack_hdf5(path)
    assert _contents(path) == before
    assert size_after < 0.7 * size_before
    with h5py.File(path, "r") as f:
        assert f["s0/forces"].compression is None          # small: contiguous
        assert f["s0/big"].compression == "gzip"             # large: still compressed
        assert sorted(f) == ["s0", "s1", "s2", "s3", "s4"]


def test_quantized_arrays_round_trip_within_half_a_quantum_and_survive_repack(tmp_path):
    import h5py

    from ase_mlks.core.io import read_array, repack_hdf5, write_array

    values = np.random.default_rng(0).normal(scale=0.5, size=5000)
    path = tmp_path / "q.h5"
    with h5py.File(path, "w") as f:
        write_array(f, "h", values, quantum=1e-6)
        write_array(f, "plain", values)
        assert f["h"].dtype == np.int32 and f["h"].attrs["quantum"] == 1e-6
    repack_hdf5(path)
    with h5py.File(path, "r") as f:
        back = read_array(f, "h")
        assert back.dtype == np.float64
        assert np.abs(back - values).max() <= 0.5e-6 + 1e-15
        assert f["h"].id.get_storage_size() < f["plain"].id.get_storage_size()
    with h5py.File(path, "a") as f, pytest.raises(ValueError, match="int32"):
        write_array(f, "huge", np.array([1e4]), quantum=1e-6)
    with h5py.File(path, "a") as f, pytest.raises(ValueError, match="real"):
        write_array(f, "cplx", np.array([1j]), quantum=1e-6)
