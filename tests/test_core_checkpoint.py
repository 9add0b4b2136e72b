"""One checkpoint format: round trip, atomic writes, clear errors for bad files."""

import pytest
import torch

from ase_mlks.core.checkpoint import (
    CheckpointMixin,
    hash_arrays,
    load_checkpoint,
    resolve_model_path,
    save_checkpoint,
)
from ase_mlks.core.errors import CheckpointError


class TinyModel(torch.nn.Module, CheckpointMixin):
    def __init__(self, width: int = 4):
        super().__init__()
        self.hparams = {"width": width}
        self.lin = torch.nn.Linear(3, width)


class OtherModel(torch.nn.Module, CheckpointMixin):
    def __init__(self):
        super().__init__()
        self.hparams = {}


def test_roundtrip(tmp_path):
    m = TinyModel(5)
    m.save(tmp_path / "m.pt", data_hash="sha256:abc")
    back = TinyModel.load(tmp_path / "m.pt")
    assert back.hparams == {"width": 5}
    for a, b in zip(m.parameters(), back.parameters()):
        assert torch.equal(a, b)
    meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["data_hash"] == "sha256:abc" and meta["package_version"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporaries
    assert (tmp_path / "m.pt").stat().st_mode & 0o044  # readable by others (umask 022)


def test_truncated_and_garbage_files_give_clear_errors(tmp_path):
    TinyModel().save(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        TinyModel.load(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        TinyModel.load(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an ase_mlks checkpoint"):
        TinyModel.load(tmp_path / "foreign.pt")


def test_incompatible_version_and_class(tmp_path):
    TinyModel().save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=False)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        TinyModel.load(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="not a OtherModel"):
        OtherModel.load(tmp_path / "m.pt")
    save_checkpoint(tmp_path / "wide.pt", TinyModel(4))
    payload = torch.load(tmp_path / "wide.pt", weights_only=False)
    payload["hparams"] = {"width": 7}
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        TinyModel.load(tmp_path / "mismatch.pt")


def test_unknown_name_lists_shipped_models():
    with pytest.raises(CheckpointError, match="not a shipped model"):
        resolve_model_path("no-such-model")


def test_hash_arrays_depends_on_content():
    import numpy as np
    assert hash_arrays(np.zeros(3)) != hash_arrays(np.ones(3))
    assert hash_arrays(np.zeros(3)) == hash_arrays(np.zeros(3))
