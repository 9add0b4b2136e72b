"""Shared electronic-structure core of ase_mlks (graphs, orbitals, H(R), calculators, training)."""

from .calculator import HamiltonianCalculator, MLCalculator
from .checkpoint import CheckpointMixin, load_checkpoint, save_checkpoint
from .errors import AseMlksError, CheckpointError, StructureError, UnknownElementError
from .graph import NeighborList, assign_layers, neighbor_list, species_index
from .hamiltonian import TBHamiltonian
from .orbitals import OrbitalBasis, wigner_D

__all__ = [
    "AseMlksError", "CheckpointError", "CheckpointMixin", "HamiltonianCalculator",
    "MLCalculator", "NeighborList", "OrbitalBasis", "StructureError", "TBHamiltonian",
    "UnknownElementError", "assign_layers", "load_checkpoint", "neighbor_list",
    "save_checkpoint", "species_index", "wigner_D",
]
