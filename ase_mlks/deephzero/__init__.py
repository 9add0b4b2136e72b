"""DeepH-Zero: an E(3)-equivariant DFT Hamiltonian trained without labels by minimizing E[H].

Li et al., "Neural-network density functional theory", PRL 133, 076401 (2024). PySCF (extra
``pyscf``) provides the DFT energy and Kohn-Sham matrix; everything else is PyTorch + e3nn.
User guide: docs/deephzero.md.
"""

from .calculator import DeepHZeroCalc
from .density import density_matrix, fermi_level, orthogonalizer
from .engine import DFTEngine, PySCFEngine, SCFResult
from .model import DeepHE3, build_graph
from .variational import FreeEnergy, variational_dft

__all__ = ["DeepHZeroCalc", "DeepHE3", "build_graph", "DFTEngine", "PySCFEngine", "SCFResult",
           "FreeEnergy", "variational_dft", "density_matrix", "fermi_level", "orthogonalizer"]
