"""Exceptions of ase_mlks: every bad input gets one, with a message naming the problem."""


class AseMlksError(Exception):
    """Base class of all ase_mlks errors."""


class UnknownElementError(AseMlksError, KeyError):
    """A structure contains an element the model or basis does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class StructureError(AseMlksError, ValueError):
    """A structure is unusable: missing cell or pbc, atoms too close, wrong dimensionality."""


class CheckpointError(AseMlksError):
    """A model file is missing, corrupt, truncated or incompatible with this version."""
