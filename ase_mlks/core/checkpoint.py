"""One checkpoint format for every model: weights + hyper-parameters + metadata, written atomically.

A checkpoint is a ``torch.save`` dictionary::

    {"format": "ase_mlks-checkpoint", "format_version": 1,
     "model_class": "ase_mlks.ofdft.model.OFDFTModel", "hparams": {...},
     "state_dict": {...}, "package_version": "0.1.0", "units": {...},
     "data_hash": "sha256:...", "created": "2026-11-22T06:00:00Z", "extra": {...}}

Shipped models live in ``ase_mlks/pretrained/<name>.pt`` and are loaded by name.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_path

FORMAT = "ase_mlks-checkpoint"
FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_UNITS = {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom"}


def _package_version() -> str:
    from .. import __version__
    return __version__


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *,
                    data_hash: str | None = None, units: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``model`` (which must carry ``hparams``) to ``path`` atomically."""
    hparams = getattr(model, "hparams", None)
    if hparams is None:
        raise CheckpointError(f"{type(model).__name__} has no 'hparams'; cannot be rebuilt")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "hparams": hparams,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "package_version": _package_version(),
        "units": units or getattr(model, "units", None) or DEFAULT_UNITS,
        "data_hash": data_hash,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def resolve_model_path(name_or_path: str | os.PathLike, prefix: str = "") -> Path:
    """A path that exists, or a shipped model name (``prefix`` + name, ``.pt`` optional)."""
    p = Path(name_or_path)
    if p.suffix == ".pt" and p.exists():
        return p
    if p.exists() and p.is_file():
        return p
    name = str(name_or_path)
    for candidate in (f"{prefix}{name}", name):
        q = PRETRAINED_DIR / (candidate if candidate.endswith(".pt") else f"{candidate}.pt")
        if q.exists():
            return q
    shipped = sorted(x.stem for x in PRETRAINED_DIR.glob(f"{prefix}*.pt"))
    raise CheckpointError(
        f"no model file {name_or_path!r}: not a path, and not a shipped model "
        f"(shipped: {', '.join(s[len(prefix):] for s in shipped) or 'none'})")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint dictionary; CheckpointError explains any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from err
    except Exception as err:  # pickle errors of many kinds
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ase_mlks checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}; this ase_mlks reads {FORMAT_VERSION}")
    for key in ("model_class", "hparams", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'")
    return payload


def _import_class(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"model class {qualname} is not available: {err}") from err


def build_model(payload: dict[str, Any], expected: type | None = None) -> torch.nn.Module:
    """Instantiate the checkpoint's class from its hparams and load the weights."""
    cls = _import_class(payload["model_class"])
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(
            f"checkpoint holds a {payload['model_class']}, not a {expected.__qualname__}")
    upgrade = getattr(cls, "upgrade_hparams", None)
    hparams = upgrade(dict(payload["hparams"])) if upgrade else payload["hparams"]
    model = cls(**hparams)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit {cls.__name__}: {err}") from err
    model.checkpoint_meta = {k: v for k, v in payload.items() if k != "state_dict"}
    model.eval()
    return model


class CheckpointMixin:
    """``model.save(path)`` and ``Model.load(path_or_shipped_name)`` for torch models.

    A subclass sets ``self.hparams`` to its JSON-able constructor arguments and may set
    ``pretrained_prefix`` (e.g. ``"ofdft-"``) so ``load("gauss3d")`` finds
    ``pretrained/ofdft-gauss3d.pt``.
    """

    pretrained_prefix: str = ""

    def save(self, path: str | os.PathLike, **meta) -> Path:
        return save_checkpoint(path, self, **meta)

    @classmethod
    def load(cls, path_or_name: str | os.PathLike, map_location: str | torch.device = "cpu"):
        path = resolve_model_path(path_or_name, prefix=cls.pretrained_prefix)
        model = build_model(load_checkpoint(path), expected=cls)
        return model.to(map_location)


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, as 'sha256:<hex>' (the training-data hash of a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def hash_arrays(*arrays) -> str:
    """sha256 over arrays' bytes (for data generated in memory from a seed)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return f"sha256:{h.hexdigest()}"
