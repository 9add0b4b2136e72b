"""DPWannier (paper 002): Deep-Potential force field + E(3)-equivariant Wannier Hamiltonian
of layered materials, for relaxations and band structures of twisted bilayers."""

from .calculator import DPWannierCalc
from .model import DPWannierModel
from .trainer import DPWannierTrainer

__all__ = ["DPWannierCalc", "DPWannierModel", "DPWannierTrainer"]
