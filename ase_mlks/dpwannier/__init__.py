"""DPWannier (paper 002): Deep-Potential force field + E(3)-equivariant Wannier Hamiltonian
of layered materials, for relaxations and band structures of twisted bilayers.

``DPWannierTrainer`` is imported lazily so that ``python -m ase_mlks.dpwannier.trainer``
runs without runpy's "found in sys.modules" warning.
"""

from __future__ import annotations

import importlib

from .calculator import DPWannierCalc
from .model import DPWannierModel

__all__ = ["DPWannierCalc", "DPWannierModel", "DPWannierTrainer"]


def __getattr__(name: str):
    if name == "DPWannierTrainer":
        return importlib.import_module("ase_mlks.dpwannier.trainer").DPWannierTrainer
    raise AttributeError(f"module 'ase_mlks.dpwannier' has no attribute {name!r}")
