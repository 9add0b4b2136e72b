"""Builders for 2D structures: monolayers, (randomly displaced) bilayers and twisted bilayers.

All structures are slabs: ``pbc = (True, True, False)``, the layers lie in the xy plane and
the cell's third vector is along z with ``vacuum`` Å of empty space on each side.

Hexagonal lattices use ASE's convention (``ase.build.mx2``): a1 = a (1, 0, 0),
a2 = a (-1/2, sqrt(3)/2, 0). Twisted cells are written in the 60-degree basis
b1 = a1, b2 = a1 + a2, where a superlattice vector ``(p, q)`` means p b1 + q b2 and the
second superlattice vector is the first rotated by 60 degrees, (-q, p + q).

Twist construction: layer 1 holds the superlattice T = (p, q) of its own lattice, layer 2
is rotated by theta = angle(p, q) - angle(r, s) (and, for near-commensurate cells, scaled
isotropically in-plane by (1 + strain)) so that its lattice vector (r, s) lands exactly on T.
Commensurate index (m, n) means (p, q) = (m, n), (r, s) = (n, m): no strain, 3 (m^2 + mn
+ n^2) atoms per MX2 layer, cos(theta) = (m^2 + 4mn + n^2) / (2 (m^2 + mn + n^2)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.build import graphene, make_supercell, mx2

from .core.errors import StructureError

__all__ = [
    "MATERIALS",
    "Material",
    "TwistInfo",
    "apply_inplane_strain",
    "bilayer",
    "bilayer_configuration",
    "find_near_commensurate",
    "monolayer",
    "random_bilayer_configurations",
    "twist_angle",
    "twisted_bilayer",
    "twisted_bilayer_from_vectors",
]


@dataclass(frozen=True)
class Material:
    """A hexagonal 2D material.

    formula: chemical formula as ase.build.mx2/graphene take it; kind: '2H', '1T' (mx2)
    or 'planar' (graphene-like); a: lattice constant (Å); thickness: vertical X-X distance
    (Å, 0 for planar); interlayer: equilibrium vertical distance between the metal (or
    first-atom) planes of an AA/AA'-stacked bilayer (Å; None for monolayer-only entries,
    whose bilayers need an explicit distance).
    """

    formula: str
    kind: str
    a: float
    thickness: float
    interlayer: float | None = None

    def interlayer_distance(self, interlayer: float | None = None) -> float:
        """``interlayer`` if given, else the material's equilibrium value (Å)."""
        if interlayer is not None:
            return float(interlayer)
        if self.interlayer is None:
            raise StructureError(f"no equilibrium interlayer distance known for "
                                 f"{self.formula} (monolayer-only entry); pass interlayer=")
        return self.interlayer


# Approximate PBE lattice constants and thicknesses (C2DB-like values; the structures are
# starting points, not relaxed minima) and PBE-D3 interlayer distances of the bulk phases.
# The entries without an interlayer distance are monolayer-only (GW model's KS data set).
MATERIALS: dict[str, Material] = {
    m.formula: m
    for m in (
        Material("MoS2", "2H", 3.184, 3.13, 6.15),
        Material("MoSe2", "2H", 3.320, 3.34, 6.46),
        Material("MoTe2", "2H", 3.550, 3.60, 6.98),
        Material("WS2", "2H", 3.186, 3.14, 6.16),
        Material("WSe2", "2H", 3.320, 3.36, 6.49),
        Material("CrS2", "2H", 3.040, 2.94, 6.00),
        Material("BN", "planar", 2.510, 0.0, 3.33),
        Material("C2", "planar", 2.467, 0.0, 3.35),
        Material("WTe2", "2H", 3.55, 3.60),
        Material("CrSe2", "2H", 3.21, 3.17),
        Material("NbS2", "2H", 3.36, 3.13),
        Material("NbSe2", "2H", 3.47, 3.36),
        Material("TiS2", "1T", 3.41, 2.85),
        Material("ZrS2", "1T", 3.69, 2.91),
        Material("HfS2", "1T", 3.64, 2.88),
        Material("SnS2", "1T", 3.70, 2.96),
        Material("PtS2", "1T", 3.57, 2.47),
        Material("ZrSe2", "1T", 3.80, 3.18),
        Material("HfSe2", "1T", 3.75, 3.14),
        Material("SnSe2", "1T", 3.87, 3.24),
        Material("PtSe2", "1T", 3.75, 2.62),
    )
}
ALIASES = {"hBN": "BN", "hbn": "BN", "graphene": "C2", "C": "C2"}


def get_material(material: str | Material) -> Material:
    """Look up a material by formula (or alias such as 'hBN', 'graphene')."""
    if isinstance(material, Material):
        return material
    key = ALIASES.get(material, material)
    if key not in MATERIALS:
        known = ", ".join(sorted(MATERIALS) + sorted(ALIASES))
        raise StructureError(f"unknown 2D material {material!r}; known: {known}")
    return MATERIALS[key]


def monolayer(material: str | Material = "MoS2", vacuum: float = 6.0, a: float | None = None,
              size: tuple[int, int] = (1, 1)) -> Atoms:
    """Monolayer primitive cell (or ``size`` supercell), slab with ``vacuum`` Å each side.

    The first atom (metal / B / C) sits at the in-plane origin.
    """
    mat = get_material(material)
    lat = mat.a if a is None else a
    if mat.kind == "planar":
        atoms = graphene(formula=mat.formula, a=lat, thickness=0.0, vacuum=vacuum)
    else:
        atoms = mx2(formula=mat.formula, kind=mat.kind, a=lat, thickness=mat.thickness,
                    vacuum=vacuum)
    atoms.pbc = (True, True, False)
    if tuple(size) != (1, 1):
        atoms = atoms.repeat((size[0], size[1], 1))
    atoms.info["material"] = mat.formula
    return atoms


def _stack(layers: list[Atoms], cell_xy: np.ndarray, vacuum: float) -> Atoms:
    """Put layers (already at their z positions) into one slab cell with vacuum along z."""
    atoms = layers[0].copy()
    for layer in layers[1:]:
        atoms += layer
    tags = np.concatenate([np.full(len(x), i, dtype=int) for i, x in enumerate(layers)])
    atoms.set_tags(tags)
    z = atoms.positions[:, 2]
    thickness = z.max() - z.min()
    cell = np.zeros((3, 3))
    cell[:2, :2] = cell_xy[:2, :2]
    cell[2, 2] = thickness + 2 * vacuum
    atoms.set_cell(cell)
    atoms.positions[:, 2] += vacuum - z.min()
    atoms.pbc = (True, True, False)
    atoms.wrap()
    return atoms


def _flat_layer(material: Material, lat: float | None = None) -> Atoms:
    """Monolayer primitive cell with its first atom at z = 0 plane of the metal atoms."""
    layer = monolayer(material, vacuum=0.0, a=lat)
    first_z = layer.positions[0, 2]
    layer.positions[:, 2] -= first_z
    return layer


def bilayer(material: str | Material = "MoS2", size: tuple[int, int] = (1, 1),
            stacking: str = "AA", shift: tuple[float, float] = (0.0, 0.0),
            interlayer: float | None = None, vacuum: float = 6.0) -> Atoms:
    """Bilayer supercell: two layers, the top one shifted in-plane by ``shift``.

    stacking: 'AA' (parallel layers; with a shift gives 3R-type AB/BA stackings) or "AA'"
    (top layer rotated by 180 degrees, 2H-type). shift: fractional coordinates of the
    primitive cell. interlayer: vertical distance between the metal planes (Å; default the
    material's equilibrium value). Atoms are tagged 0 (bottom) and 1 (top).
    """
    mat = get_material(material)
    if stacking not in ("AA", "AA'"):
        raise StructureError(f"stacking must be 'AA' or \"AA'\", got {stacking!r}")
    d = mat.interlayer_distance(interlayer)
    if d < mat.thickness + 1.0:
        raise StructureError(f"interlayer distance {d:.2f} Å puts the layers into each other "
                             f"(layer thickness {mat.thickness:.2f} Å)")
    bottom = _flat_layer(mat)
    top = bottom.copy()
    if stacking == "AA'":
        # rotate 180 degrees about z through the first atom: swaps the X sublattice
        top.positions[:, :2] *= -1.0
    top.positions[:, :2] += np.asarray(shift, float) @ bottom.cell[:2, :2]
    top.positions[:, 2] += d
    n1, n2 = size
    bottom = bottom.repeat((n1, n2, 1))
    top = top.repeat((n1, n2, 1))
    atoms = _stack([bottom, top], bottom.cell[:], vacuum)
    atoms.info.update(material=mat.formula, stacking=stacking, shift=tuple(map(float, shift)),
                      interlayer=d)
    return atoms


def bilayer_configuration(rng: np.random.Generator, material: str | Material = "MoS2",
                          size: tuple[int, int] | None = None, stacking: str = "AA",
                          gap_range: tuple[float, float] = (-0.3, 0.7),
                          rattle_probability: float = 0.9, rattle_std: float = 0.04,
                          vacuum: float = 6.0, strain: float = 0.0,
                          twist: tuple[int, int] | None = None) -> Atoms:
    """One DPWannier-style training configuration of a bilayer supercell.

    The top layer is displaced rigidly by a random 3-D vector: in-plane uniformly anywhere in
    the primitive cell, out of plane by a uniform offset in ``gap_range`` (Å) around the
    equilibrium interlayer distance. With probability ``rattle_probability`` every atom is
    then moved by a Gaussian of standard deviation ``rattle_std`` (Å) per Cartesian component.
    With ``strain`` > 0 the whole cell (both layers) is then deformed in-plane by a random
    symmetric strain tensor: a biaxial part uniform in [−strain, strain] plus an anisotropic
    part (ε_xx − ε_yy)/2 and a shear ε_xy, each uniform in [−strain/4, strain/4]. This gives
    the compressed and stretched layers of near-commensurate twisted cells, which unstrained
    configurations never show the force field.
    ``size`` repeats the primitive cell (default 2x2). With ``twist=(m, n)`` the starting
    point is instead the commensurate twisted cell :func:`twisted_bilayer` (m, n), repeated
    ``size`` times (default once), and the in-plane shift is
    uniform over that whole cell: configurations that show the force field the rotated
    neighbourhoods of a moiré, which aligned 2x2 cells never do.
    atoms.info records shift (fractional, of the primitive cell, or of the twisted cell),
    interlayer (Å), rattle_std (0 if not rattled), twist (m, n) if twisted and, with strain,
    the strain tensor (eps_xx, eps_yy, eps_xy).
    """
    mat = get_material(material)
    shift = rng.uniform(0.0, 1.0, size=2)
    d = mat.interlayer_distance() + rng.uniform(*gap_range)
    size = size or ((2, 2) if twist is None else (1, 1))
    if twist is None:
        atoms = bilayer(mat, size=size, stacking=stacking, shift=tuple(shift), interlayer=d,
                        vacuum=vacuum)
    else:
        atoms = _shifted_twisted_bilayer(mat, twist, stacking, shift, d, size, vacuum)
    std = rattle_std if rng.uniform() < rattle_probability else 0.0
    if std > 0:
        atoms.positions += rng.normal(0.0, std, size=(len(atoms), 3))
        atoms.wrap()
    atoms.info["rattle_std"] = float(std)
    if strain > 0:
        # drawn after everything else so unstrained configurations of a seed stay the same
        _random_inplane_strain(atoms, rng, strain)
    return atoms


def _shifted_twisted_bilayer(mat: Material, twist: tuple[int, int], stacking: str,
                             shift: np.ndarray, interlayer: float, size: tuple[int, int],
                             vacuum: float) -> Atoms:
    """Twisted cell ``twist`` with its top layer moved in-plane by ``shift`` (fractional)."""
    m, n = twist
    atoms = twisted_bilayer(mat, m, n, interlayer=interlayer, vacuum=vacuum, stacking=stacking)
    top = atoms.get_tags() == 1
    atoms.positions[top, :2] += np.asarray(shift, float) @ atoms.cell[:2, :2]
    atoms.wrap()
    atoms = atoms.repeat((*size, 1))  # tags (the layers) repeat with the atoms
    # info['twist'] becomes the plain (m, n), not a TwistInfo; 'strain' is left to the random
    # strain tensor, and the per-layer atom counts would be wrong after the repeat
    for key in ("strain", "natoms_layers"):
        atoms.info.pop(key, None)
    atoms.info.update(twist=(int(m), int(n)), shift=tuple(map(float, shift)),
                      stacking=stacking)
    return atoms


def _random_inplane_strain(atoms: Atoms, rng: np.random.Generator, strain: float) -> None:
    """Strain ``atoms`` in place by a random in-plane tensor; record it in atoms.info.

    Biaxial part uniform over the full range [−strain, strain] (near-commensurate cells
    strain a layer biaxially: −3.2 % at 3.42°, −7.2 % at 8.95°) plus a smaller anisotropic
    part (ε_xx − ε_yy)/2 and shear ε_xy, each uniform in [−strain/4, strain/4].
    """
    biaxial = rng.uniform(-strain, strain)
    aniso, exy = rng.uniform(-strain / 4, strain / 4, size=2)
    exx, eyy = biaxial + aniso, biaxial - aniso
    apply_inplane_strain(atoms, np.array([[exx, exy], [exy, eyy]]))
    atoms.info["strain"] = (float(exx), float(eyy), float(exy))


def monolayer_configuration(rng: np.random.Generator, material: str | Material = "MoS2",
                            size: tuple[int, int] = (1, 1), rattle_std: float = 0.05,
                            strain: float = 0.03, vacuum: float = 6.0) -> Atoms:
    """A distorted monolayer: every atom moved by a Gaussian of ``rattle_std`` Å per
    Cartesian component, then the cell strained in-plane (biaxial part uniform in
    [−strain, strain], anisotropic part and shear in [−strain/4, strain/4], as for the
    bilayers). For Hamiltonian training sets (e.g. AO H(R), S(R) of GPAW's basis).
    atoms.info records rattle_std and the strain tensor (eps_xx, eps_yy, eps_xy).
    """
    atoms = monolayer(material, vacuum=vacuum, size=size)
    atoms.positions += rng.normal(0.0, rattle_std, size=(len(atoms), 3))
    atoms.wrap()
    atoms.info["rattle_std"] = float(rattle_std)
    if strain > 0:
        _random_inplane_strain(atoms, rng, strain)
    return atoms


def apply_inplane_strain(atoms: Atoms, eps: np.ndarray) -> None:
    """Deform ``atoms`` in place by the symmetric 2×2 in-plane strain ``eps`` (x, y only).

    Cell vectors and positions map as r -> (1 + ε) r in the plane; z is untouched, so
    layer thicknesses and the interlayer distance stay as they were.
    """
    eps = np.asarray(eps, float)
    if eps.shape != (2, 2) or not np.allclose(eps, eps.T):
        raise StructureError(f"in-plane strain must be a symmetric 2x2 tensor, got {eps!r}")
    deform = np.eye(3)
    deform[:2, :2] += eps
    atoms.set_cell(atoms.cell[:] @ deform.T, scale_atoms=False)
    atoms.positions = atoms.positions @ deform.T


def random_bilayer_configurations(n: int, seed: int = 0, **kwargs) -> list[Atoms]:
    """``n`` configurations from :func:`bilayer_configuration` with a reproducible seed."""
    rng = np.random.default_rng(seed)
    return [bilayer_configuration(rng, **kwargs) for _ in range(n)]


# ----------------------------------------------------------------------------------------
# twisted bilayers

def _hex60_basis(a: float) -> np.ndarray:
    """Rows b1, b2 of the 60-degree hexagonal basis (2D, Å)."""
    return a * np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])


def _angle(vec: tuple[int, int]) -> float:
    p, q = vec
    return math.atan2(q * math.sqrt(3) / 2, p + q / 2)


def _norm2(vec: tuple[int, int]) -> int:
    """|p b1 + q b2|^2 / a^2 = number of primitive cells in the 60-degree superlattice."""
    p, q = vec
    return p * p + p * q + q * q


def twist_angle(m: int, n: int) -> float:
    """Twist angle (degrees) of the commensurate cell with index (m, n)."""
    return math.degrees(_angle((m, n)) - _angle((n, m)))


@dataclass(frozen=True)
class TwistInfo:
    """What a twisted cell is: vectors (60-degree basis), angle, strain of layer 2, counts."""

    v1: tuple[int, int]
    v2: tuple[int, int]
    angle: float  # degrees
    strain: float  # isotropic in-plane strain applied to layer 2 (0 = commensurate)
    natoms_layers: tuple[int, int]


def _twist_info(material: Material, v1, v2) -> TwistInfo:
    nat = len(_flat_layer(material))
    angle = math.degrees(_angle(v1) - _angle(v2))
    strain = math.sqrt(_norm2(v1) / _norm2(v2)) - 1.0
    return TwistInfo(tuple(v1), tuple(v2), angle, strain, (nat * _norm2(v1), nat * _norm2(v2)))


def _layer_supercell(layer: Atoms, vec: tuple[int, int]) -> Atoms:
    """Supercell of a primitive layer (ASE 120-degree cell) spanned by vec and vec rotated 60."""
    p, q = vec
    t60 = np.array([[p, q], [-q, p + q]])  # superlattice rows in the 60-degree basis
    to120 = np.array([[1, 0], [1, 1]])  # b1 = a1, b2 = a1 + a2
    P = np.eye(3, dtype=int)
    P[:2, :2] = t60 @ to120
    cell = layer.cell.copy()
    cell[2, 2] = 1.0  # make_supercell needs a full-rank cell
    prim = layer.copy()
    prim.set_cell(cell)
    prim.pbc = True
    sup = make_supercell(prim, P, wrap=False)
    sup.pbc = (True, True, False)
    sup.wrap()  # in-plane only: z is not periodic
    return sup


def twisted_bilayer_from_vectors(material: str | Material, v1: tuple[int, int],
                                 v2: tuple[int, int], interlayer: float | None = None,
                                 vacuum: float = 6.0, stacking: str = "AA") -> Atoms:
    """Twisted bilayer: layer-1 superlattice ``v1``, layer-2 lattice vector ``v2`` put on it.

    Layer 2 is rotated about the origin (a metal atom: AA stacking there for 'AA') and, if
    |v1| != |v2|, strained isotropically in-plane. atoms.info['twist'] is a TwistInfo
    (angle in degrees, strain of layer 2, atoms per layer); tags 0/1 mark the layers.
    """
    mat = get_material(material)
    for v in (v1, v2):
        if len(v) != 2 or _norm2(v) <= 0:
            raise StructureError(f"superlattice vector {tuple(v)} must be two integers, "
                                 "not both zero")
    info = _twist_info(mat, v1, v2)
    if abs(info.angle) < 1e-8:
        raise StructureError(f"vectors {v1} and {v2} give no twist (angle 0)")
    d = mat.interlayer_distance(interlayer)
    bottom = _flat_layer(mat)
    top = bottom.copy()
    if stacking == "AA'":
        top.positions[:, :2] *= -1.0
    elif stacking != "AA":
        raise StructureError(f"stacking must be 'AA' or \"AA'\", got {stacking!r}")
    theta = math.radians(info.angle)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    scale = 1.0 + info.strain
    cell2 = top.cell[:].copy()
    cell2[:2, :2] = scale * cell2[:2, :2] @ rot.T
    pos2 = top.positions.copy()
    pos2[:, :2] = scale * pos2[:, :2] @ rot.T
    top.set_cell(cell2)
    top.positions = pos2
    top.positions[:, 2] += d
    lower = _layer_supercell(bottom, tuple(v1))
    upper = _layer_supercell(top, tuple(v2))
    mismatch = np.abs(lower.cell[:2, :2] - upper.cell[:2, :2]).max()
    if mismatch > 1e-6:  # guards the construction itself, not user input
        raise StructureError(f"twisted layers do not share a cell (mismatch {mismatch:.2e} Å)")
    atoms = _stack([lower, upper], lower.cell[:], vacuum)
    atoms.info.update(material=mat.formula, twist=info, twist_angle=info.angle,
                      strain=info.strain, natoms_layers=info.natoms_layers, interlayer=d)
    return atoms


def twisted_bilayer(material: str | Material = "MoS2", m: int = 1, n: int = 2,
                    interlayer: float | None = None, vacuum: float = 6.0,
                    stacking: str = "AA") -> Atoms:
    """Commensurate twisted bilayer with index (m, n); e.g. MoS2 (1, 2): 21.79°, 42 atoms.

    (2, 3): 13.17°, 114 atoms; (3, 4): 9.43°, 222 atoms. Raises StructureError for indices
    without a commensurate twisted cell (m == n, negative, or not coprime).
    """
    if not (isinstance(m, int | np.integer) and isinstance(n, int | np.integer)):
        raise StructureError(f"twist index must be integers, got ({m!r}, {n!r})")
    if m < 0 or n < 0 or m == n or math.gcd(m, n) != 1:
        raise StructureError(
            f"twist index ({m}, {n}) gives no commensurate twisted cell: need coprime "
            "non-negative integers with m != n, e.g. (1, 2) for 21.79°")
    return twisted_bilayer_from_vectors(material, (m, n), (n, m), interlayer=interlayer,
                                        vacuum=vacuum, stacking=stacking)


def find_near_commensurate(material: str | Material, angle: float, max_atoms: int,
                           max_strain: float = 0.08, angle_tol: float = 0.05,
                           max_index: int = 40) -> list[TwistInfo]:
    """Near-commensurate twisted cells of about ``angle`` degrees with at most ``max_atoms``.

    Searches superlattice vectors v1 (layer 1) and v2 (layer 2) in the 60-degree basis
    with |angle(v1) - angle(v2) - angle| <= angle_tol and |strain| <= max_strain; returns
    candidates sorted by |strain| then atom count. The DPWannier paper's 8.95° (201 atoms)
    and 3.42° (1,308 atoms) MoS2 cells are v1 = (5, 1), v2 = (6, 0) and (14, 1), (15, 0).
    """
    mat = get_material(material)
    nat = len(_flat_layer(mat))
    found = []
    rng = range(-max_index, max_index + 1)
    vecs = [(p, q) for p in rng for q in rng
            if (p, q) != (0, 0) and 0 <= _angle((p, q)) < math.pi / 3]
    for v1 in vecs:
        n1 = _norm2(v1)
        if 2 * nat * n1 > max_atoms * 1.5:
            continue
        for v2 in vecs:
            n2 = _norm2(v2)
            if nat * (n1 + n2) > max_atoms:
                continue
            ang = math.degrees(_angle(v1) - _angle(v2))
            if abs(ang - angle) > angle_tol:
                continue
            strain = math.sqrt(n1 / n2) - 1.0
            if abs(strain) <= max_strain:
                found.append(_twist_info(mat, v1, v2))
    found.sort(key=lambda t: (abs(t.strain), sum(t.natoms_layers)))
    return found
