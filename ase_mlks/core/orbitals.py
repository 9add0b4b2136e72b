"""Atomic-orbital bases: per-element shells, the real-spherical-harmonic order, Wigner-D blocks.

Order convention (used by every model and by ``TBHamiltonian``)
-------------------------------------------------------------
Inside an atom, shells come in the order the basis lists them. Inside a shell of angular
momentum l the 2l+1 real spherical harmonics are ordered m = -l..l with the z axis polar
(the order GPAW and Wannier90 use)::

    l = 0:  s
    l = 1:  p_y, p_z, p_x
    l = 2:  d_xy, d_yz, d_z2, d_xz, d_x2-y2
    l = 3:  f_y(3x2-y2), f_xyz, f_yz2, f_z3, f_xz2, f_z(x2-y2), f_x(x2-3y2)

Each function is the polynomial written above (positive leading coefficient) normalized
on the unit sphere. e3nn 0.6 uses another order (l=1 is (x, y, z), y polar for l >= 2);
``wigner_D`` converts e3nn's matrices into this order, so a rotated structure's
Hamiltonian block is ``D_i(R) @ H_ij @ D_j(R).T``.

PySCF orders p shells as (p_x, p_y, p_z) and all other shells as above: see
``pyscf_to_ours``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols
from e3nn import o3
from scipy.linalg import block_diag

from .errors import UnknownElementError

L_LETTERS = "spdfg"

ORBITAL_LABELS: dict[int, tuple[str, ...]] = {
    0: ("s",),
    1: ("py", "pz", "px"),
    2: ("dxy", "dyz", "dz2", "dxz", "dx2-y2"),
    3: ("fy3x2", "fxyz", "fyz2", "fz3", "fxz2", "fzx2", "fx3y2"),
}


def _real_sh_polynomials(l: int, xyz: np.ndarray) -> np.ndarray:
    """Unnormalized real solid harmonics in this module's order; xyz has shape (N, 3)."""
    x, y, z = xyz.T
    r2 = x**2 + y**2 + z**2
    if l == 0:
        cols = [np.ones_like(x)]
    elif l == 1:
        cols = [y, z, x]
    elif l == 2:
        cols = [x * y, y * z, 3 * z**2 - r2, x * z, x**2 - y**2]
    elif l == 3:
        cols = [
            y * (3 * x**2 - y**2),
            x * y * z,
            y * (5 * z**2 - r2),
            z * (5 * z**2 - 3 * r2),
            x * (5 * z**2 - r2),
            z * (x**2 - y**2),
            x * (x**2 - 3 * y**2),
        ]
    else:
        raise ValueError(f"angular momentum l={l} is not supported (max 3)")
    return np.stack(cols, axis=1)


@functools.cache
def e3nn_to_ours(l: int) -> np.ndarray:
    """Orthogonal matrix P with ``Y_ours = P @ Y_e3nn`` for angular momentum ``l``.

    Found by least squares on random directions: both sets span the same irreducible
    space, so the map is exact (checked to 1e-10) and orthogonal after row normalization.
    """
    rng = np.random.default_rng(1234)
    v = rng.normal(size=(200, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    y_e3 = o3.spherical_harmonics(l, torch.from_numpy(v), normalize=True).numpy()
    y_ours = _real_sh_polynomials(l, v)
    coef, *_ = np.linalg.lstsq(y_e3, y_ours, rcond=None)  # y_ours = y_e3 @ coef
    p = coef.T
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    if not np.allclose(p @ p.T, np.eye(2 * l + 1), atol=1e-10):
        raise RuntimeError(f"real-SH basis change for l={l} is not orthogonal")
    return p


def wigner_D(l: int, rotation: np.ndarray) -> np.ndarray:
    """Wigner-D matrix (2l+1, 2l+1) of an orthogonal 3x3 matrix in this module's real-SH order.

    ``Y_l(R r) = wigner_D(l, R) @ Y_l(r)``; ``rotation`` acts on column vectors. Improper
    ones (det = -1: mirrors, inversion) are the inversion times a rotation; orbitals of
    angular momentum l have parity (-1)^l.
    """
    rotation = np.asarray(rotation, dtype=float)
    if np.linalg.det(rotation) < 0:
        return (-1) ** l * wigner_D(l, -rotation)
    r = torch.as_tensor(rotation, dtype=torch.float64)
    # e3nn builds D from generators in the default dtype: force float64 for 1e-12 accuracy.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        d_e3 = o3.Irrep(l, (-1) ** l).D_from_matrix(r).numpy()
    finally:
        torch.set_default_dtype(previous)
    p = e3nn_to_ours(l)
    return p @ d_e3 @ p.T


def pyscf_to_ours(l: int) -> np.ndarray:
    """Permutation matrix mapping PySCF's order of an l-shell to ours (``c_ours = P @ c_pyscf``)."""
    p = np.eye(2 * l + 1)
    if l == 1:  # PySCF: (x, y, z); ours: (y, z, x)
        p = p[[1, 2, 0]]
    return p


_SHELL_RE = re.compile(r"^(\d*)([spdfg])$")


@dataclass(frozen=True)
class Shell:
    """One radial shell of an element: principal label ``n`` (0 if unknown) and ``l``."""

    n: int
    l: int

    @property
    def size(self) -> int:
        return 2 * self.l + 1

    @property
    def name(self) -> str:
        return f"{self.n or ''}{L_LETTERS[self.l]}"


def parse_shell(spec: str | tuple[int, int]) -> Shell:
    """'4d' -> Shell(4, 2); 'p' -> Shell(0, 1); (3, 1) -> Shell(3, 1)."""
    if isinstance(spec, tuple):
        return Shell(int(spec[0]), int(spec[1]))
    m = _SHELL_RE.match(spec.strip().lower())
    if not m:
        raise ValueError(f"cannot parse orbital shell {spec!r}; expected e.g. '4d', '3p', 's'")
    return Shell(int(m.group(1) or 0), L_LETTERS.index(m.group(2)))


class OrbitalBasis:
    """Per-element list of orbital shells, e.g. ``OrbitalBasis({"Mo": "4d", "S": "3p"})``.

    Values may be one shell string, a list of them, or a string of several separated by
    spaces or commas (``"1s 2s 2p"``).
    """

    def __init__(self, shells: Mapping[str | int, str | Sequence]):
        self.shells: dict[int, tuple[Shell, ...]] = {}
        for key, spec in shells.items():
            z = key if isinstance(key, int) else atomic_numbers[key]
            if isinstance(spec, str):
                spec = re.split(r"[\s,]+", spec.strip())
            self.shells[z] = tuple(parse_shell(s) for s in spec)

    # -- description ---------------------------------------------------------------
    def to_dict(self) -> dict[str, list[str]]:
        """JSON-able description (inverse of the constructor)."""
        return {chemical_symbols[z]: [s.name or L_LETTERS[s.l] for s in sh]
                for z, sh in self.shells.items()}

    def __repr__(self) -> str:
        return f"OrbitalBasis({self.to_dict()})"

    def __eq__(self, other) -> bool:
        return isinstance(other, OrbitalBasis) and self.shells == other.shells

    @property
    def elements(self) -> list[int]:
        return sorted(self.shells)

    def _z(self, element: int | str) -> int:
        z = element if isinstance(element, int | np.integer) else atomic_numbers[element]
        if int(z) not in self.shells:
            known = ", ".join(chemical_symbols[k] for k in self.elements)
            raise UnknownElementError(
                f"element {chemical_symbols[int(z)]} is not in this orbital basis (knows {known})")
        return int(z)

    def check_elements(self, numbers: Sequence[int]) -> None:
        """Raise UnknownElementError naming the first element without orbitals."""
        for z in np.unique(np.asarray(numbers)):
            self._z(int(z))

    def shells_of(self, element: int | str) -> tuple[Shell, ...]:
        return self.shells[self._z(element)]

    def norb(self, element: int | str) -> int:
        """Number of orbitals on one atom of ``element``."""
        return sum(s.size for s in self.shells_of(element))

    def lmax(self) -> int:
        return max(s.l for sh in self.shells.values() for s in sh)

    def irreps(self, element: int | str) -> o3.Irreps:
        """e3nn irreps of the element's orbitals (parity (-1)^l), one irrep per shell.

        Note: e3nn's component order inside an irrep differs from ours; convert with
        ``e3nn_to_ours``.
        """
        return o3.Irreps([(1, (s.l, (-1) ** s.l)) for s in self.shells_of(element)])

    def labels(self, element: int | str) -> list[str]:
        """Orbital labels in order, e.g. ['4dxy', ..., '4dx2-y2']."""
        return [f"{s.n or ''}{lab}" for s in self.shells_of(element)
                for lab in ORBITAL_LABELS[s.l]]

    # -- layout for a structure -------------------------------------------------------
    def orbital_offsets(self, numbers: Sequence[int]) -> np.ndarray:
        """Start index of each atom's orbitals plus the total at the end, shape (natoms+1,)."""
        sizes = [self.norb(int(z)) for z in numbers]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def orbital_slices(self, numbers: Sequence[int]) -> list[slice]:
        off = self.orbital_offsets(numbers)
        return [slice(int(a), int(b)) for a, b in zip(off[:-1], off[1:])]

    def total_norb(self, numbers: Sequence[int]) -> int:
        return int(self.orbital_offsets(numbers)[-1])

    def orbital_atoms(self, numbers: Sequence[int]) -> np.ndarray:
        """Atom index of every orbital, shape (norb,)."""
        return np.repeat(np.arange(len(numbers)), [self.norb(int(z)) for z in numbers])

    def rotation_matrix(self, element: int | str, rotation: np.ndarray) -> np.ndarray:
        """Block-diagonal Wigner-D of one atom's orbitals, shape (norb, norb)."""
        return block_diag(*[wigner_D(s.l, rotation) for s in self.shells_of(element)])

    def structure_rotation(self, numbers: Sequence[int], rotation: np.ndarray) -> np.ndarray:
        """Block-diagonal Wigner-D over all atoms of a structure, shape (norb_total, norb_total)."""
        return block_diag(*[self.rotation_matrix(int(z), rotation) for z in numbers])


def block_D(basis: OrbitalBasis, element: int | str, rotation: np.ndarray) -> np.ndarray:
    """Functional alias of ``OrbitalBasis.rotation_matrix``."""
    return basis.rotation_matrix(element, rotation)
