"""GPAW reference pipeline: ground states (+D3), Wannier H(R), AO H(R)/S(R), KS states, G0W0.

Command line: ``python -m ase_mlks.reference --help`` (or ``ase-mlks reference ...``).
GPAW is imported only when a calculation runs, so importing this package is cheap.
"""

from .settings import DEFAULT, FAST, LCAOSettings

__all__ = ["DEFAULT", "FAST", "LCAOSettings"]
