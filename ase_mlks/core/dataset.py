"""HDF5 structure datasets: one group per structure, appendable and resumable, plus a torch view.

Layout::

    /<key>/numbers  (natoms,) int      /<key>/positions (natoms, 3) Å
    /<key>/cell     (3, 3) Å           /<key>/pbc       (3,) bool
    /<key>/<name>   any further array (energy, forces, stress, ...), float32 gzip
    /<key>/<name>/  nested groups (e.g. a TBHamiltonian) written by a callback
    /<key>.attrs    metadata (settings JSON, code versions, CPU time)

Each structure is written in one go and flushed, and an existing key is never
overwritten, so a generator killed mid-run resumes by skipping what is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from ase import Atoms

from .errors import AseMlksError
from .io import read_array, write_array


class StructureDataset:
    """An HDF5 file of structures with arbitrary per-structure arrays."""

    def __init__(self, path: str | os.PathLike, mode: str = "a"):
        self.path = Path(path)
        if mode != "r":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = h5py.File(self.path, mode)
        except OSError as err:
            raise AseMlksError(f"cannot open dataset {self.path}: {err}") from err

    # context manager -------------------------------------------------------------
    def __enter__(self) -> StructureDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    # access ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Keys of complete structures (a group is complete once its 'complete' flag is set)."""
        return [k for k in self._file if self._file[k].attrs.get("complete", False)]

    def __contains__(self, key: str) -> bool:
        return key in self._file and bool(self._file[key].attrs.get("complete", False))

    def __len__(self) -> int:
        return len(self.keys())

    def group(self, key: str) -> h5py.Group:
        return self._file[key]

    def append(self, key: str, atoms: Atoms, metadata: dict[str, Any] | None = None,
               writer: Callable[[h5py.Group], None] | None = None, **arrays) -> bool:
        """Store one structure; returns False (and writes nothing) if ``key`` is complete.

        ``writer(group)`` may add nested content (e.g. ``TBHamiltonian.to_hdf5``). A group
        left incomplete by a crash is replaced.
        """
        if key in self:
            return False
        if key in self._file:
            del self._file[key]
        g = self._file.create_group(key)
        write_array(g, "numbers", np.asarray(atoms.numbers, np.int32))
        write_array(g, "positions", atoms.positions, np.float64)
        write_array(g, "cell", np.asarray(atoms.cell), np.float64)
        write_array(g, "pbc", np.asarray(atoms.pbc, bool))
        for name, value in arrays.items():
            if value is not None:
                write_array(g, name, value)
        if writer is not None:
            writer(g)
        for name, value in (metadata or {}).items():
            g.attrs[name] = value if isinstance(value, int | float | str) else json.dumps(value)
        g.attrs["complete"] = True
        self._file.flush()
        return True

    def read(self, key: str) -> dict[str, Any]:
        """All plain arrays of one structure plus 'atoms' (nested groups are skipped)."""
        g = self._file[key]
        out: dict[str, Any] = {
            name: read_array(g, name) for name, obj in g.items() if isinstance(obj, h5py.Dataset)
        }
        out["atoms"] = Atoms(numbers=out["numbers"], positions=out["positions"],
                             cell=out["cell"], pbc=out["pbc"])
        out["attrs"] = dict(g.attrs)
        return out

    def read_atoms(self, key: str) -> Atoms:
        return self.read(key)["atoms"]

    def split(self, fraction: float = 0.8, seed: int = 0) -> tuple[list[str], list[str]]:
        """Deterministic train/held-out split of the keys."""
        keys = sorted(self.keys())
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(keys))
        n = int(round(fraction * len(keys)))
        return [keys[i] for i in sorted(perm[:n])], [keys[i] for i in sorted(perm[n:])]


class TorchStructureDataset(torch.utils.data.Dataset):
    """Reads structures lazily from an HDF5 dataset; ``transform(record) -> sample``."""

    def __init__(self, path: str | os.PathLike, keys: Iterable[str] | None = None,
                 transform: Callable[[dict[str, Any]], Any] | None = None, cache: bool = True):
        self.path = Path(path)
        with StructureDataset(self.path, "r") as ds:
            self.keys = list(keys) if keys is not None else sorted(ds.keys())
        self.transform = transform
        self._cache: dict[int, Any] | None = {} if cache else None
        self._ds: StructureDataset | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        if self._ds is None:  # opened lazily: h5py handles must not cross fork()
            self._ds = StructureDataset(self.path, "r")
        record = self._ds.read(self.keys[index])
        sample = self.transform(record) if self.transform else record
        if self._cache is not None:
            self._cache[index] = sample
        return sample
