"""Atomic file writes and compact HDF5 array helpers."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the final file the usual umask-based permissions
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_array(group, name: str, array, dtype=np.float32):
    """Write ``array`` into an h5py group, gzip-compressed; floats stored as ``dtype``.

    Integer and boolean arrays keep their type; complex arrays become complex64 when
    ``dtype`` is float32.
    """
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.complexfloating):
        a = a.astype(np.complex64 if np.dtype(dtype) == np.float32 else np.complex128)
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(dtype)
    if name in group:
        del group[name]
    if a.ndim == 0:
        return group.create_dataset(name, data=a)
    return group.create_dataset(name, data=a, **COMPRESSION)


def read_array(group, name: str, dtype=None) -> np.ndarray:
    """Read a dataset from an h5py group as a numpy array (optionally cast)."""
    a = group[name][()]
    return np.asarray(a, dtype=dtype) if dtype is not None else np.asarray(a)
