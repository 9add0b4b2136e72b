"""ase_mlks: ASE calculators for machine-learned electronic structure.

Calculators are imported lazily so that ``import ase_mlks`` stays cheap and a model's
optional dependency (PySCF, GPAW) is needed only when that model is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TBHamiltonian": "ase_mlks.core.hamiltonian",
    "OrbitalBasis": "ase_mlks.core.orbitals",
    "DPWannierCalc": "ase_mlks.dpwannier",
    "DeepHZeroCalc": "ase_mlks.deephzero",
    "GWCorrection": "ase_mlks.gw",
    "GWCalc": "ase_mlks.gw",
    "OFDFTCalc": "ase_mlks.ofdft",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ase_mlks' has no attribute {name!r}")
