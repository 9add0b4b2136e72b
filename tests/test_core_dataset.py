"""HDF5 structure datasets: append, resume, read, split, torch view."""

import numpy as np
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
