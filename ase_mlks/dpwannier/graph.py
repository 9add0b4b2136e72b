"""Batched torch graphs for DPWannierModel: species, edges with cell shifts, layers.

Neighbour search and layer assignment come from ``ase_mlks.core.graph``; this module only
packs their output (for one or several structures) into tensors the model consumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers

from ase_mlks.core.errors import StructureError
from ase_mlks.core.graph import assign_layers, neighbor_list, species_index


@dataclass
class DPGraph:
    """Tensors of a batch of ``B`` structures with ``N`` atoms in total.

    Edges are directed (i -> j) with integer cell shifts S: vector = r_j + S.cell - r_i.
    ``ff_*`` edges feed the force field (cutoff ``rc``); ``h_*`` edges are the hopping
    pairs (cutoff ``h_cutoff``, every i != j or S != 0); ``h_rev[e]`` is the edge j -> i, -S.
    ``layer`` is a batch-global layer index; ``layer_feat`` (nlayers, 2) holds each layer's
    in-plane strain and N_out/N_in ratio for the vacuum-level alignment.
    """

    species: torch.Tensor      # (N,) int64
    positions: torch.Tensor    # (N, 3) Å
    cell: torch.Tensor         # (B, 3, 3) Å
    batch: torch.Tensor        # (N,) int64 structure index
    layer: torch.Tensor        # (N,) int64 batch-global layer index
    layer_feat: torch.Tensor   # (nlayers, 2)
    ff_i: torch.Tensor
    ff_j: torch.Tensor
    ff_shift: torch.Tensor     # (E, 3) float (integer values)
    h_i: torch.Tensor
    h_j: torch.Tensor
    h_shift: torch.Tensor      # (H, 3) float (integer values)
    h_rev: torch.Tensor        # (H,) int64
    natoms: torch.Tensor       # (B,) int64
    volume: torch.Tensor       # (B,) Å^3

    @property
    def nstruct(self) -> int:
        return len(self.cell)

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None
           ) -> DPGraph:
        """Copy with float tensors cast to ``dtype`` and everything moved to ``device``."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[f.name] = t.to(device) if device is not None else t
        return DPGraph(**out)


def reverse_edges(i: np.ndarray, j: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Index of the reverse edge (j -> i, -S) of every directed edge; raises if one is missing."""
    s = np.asarray(shifts, dtype=np.int64)
    key = np.stack([i, j, s[:, 0], s[:, 1], s[:, 2]], axis=1)
    rkey = np.stack([j, i, -s[:, 0], -s[:, 1], -s[:, 2]], axis=1)
    order = np.lexsort(key.T[::-1])
    sorted_keys = key[order]
    # Binary search row-wise through a structured view.
    dt = np.dtype([(f"f{k}", np.int64) for k in range(5)])
    sk = np.ascontiguousarray(sorted_keys).view(dt).ravel()
    rk = np.ascontiguousarray(rkey).view(dt).ravel()
    pos = np.searchsorted(sk, rk)
    pos = np.clip(pos, 0, len(sk) - 1)
    if len(sk) and not np.array_equal(sk[pos], rk):
        raise RuntimeError("neighbour list is not symmetric (missing reverse edges)")
    return order[pos]


def layer_features(atoms: Atoms, layers: np.ndarray, areal_density: float) -> np.ndarray:
    """Per layer: (strain, N_out / N_in); strain from the layer's areal atom density.

    strain = sqrt(rho0 / rho_layer) - 1 with rho0 the unstrained density (atoms/Å^2), so a
    layer stretched by 2% in-plane has strain 0.02.
    """
    area = float(np.linalg.norm(np.cross(atoms.cell[0], atoms.cell[1])))
    nlay = int(layers.max()) + 1 if len(layers) else 0
    counts = np.bincount(layers, minlength=nlay).astype(float)
    feats = np.zeros((nlay, 2))
    for k in range(nlay):
        rho = counts[k] / area
        feats[k, 0] = np.sqrt(areal_density / rho) - 1.0
        feats[k, 1] = (counts.sum() - counts[k]) / counts[k]
    return feats


def check_structure(atoms: Atoms, species: Sequence[str], min_distance: float) -> None:
    """Clear errors for unusable input: no periodic cell, unknown elements, atoms too close."""
    if not atoms.pbc[0] or not atoms.pbc[1]:
        raise StructureError(
            "DPWannier needs a structure periodic in x and y (pbc=(True, True, False) for a "
            f"slab); got pbc={tuple(bool(p) for p in atoms.pbc)}")
    if atoms.cell.rank < 3:
        raise StructureError("DPWannier needs a full 3x3 cell (include the vacuum along z)")
    species_index(atoms.numbers, [atomic_numbers[s] for s in species])


def structure_graph(atoms: Atoms, species: Sequence[str], rc: float, h_cutoff: float,
                    areal_density: float, min_distance: float = 0.0,
                    layers: np.ndarray | None = None) -> DPGraph:
    """DPGraph (float64) of one structure; layers from ``core.graph.assign_layers``."""
    check_structure(atoms, species, min_distance)
    nl = neighbor_list(atoms, max(rc, h_cutoff))
    d = np.asarray(nl.distances)
    if min_distance > 0 and len(d) and d.min() < min_distance:
        k = int(np.argmin(d))
        raise StructureError(
            f"atoms {int(nl.i[k])} and {int(nl.j[k])} are {d[k]:.3f} Å apart, closer than "
            f"the model's training range ({min_distance:.2f} Å)")
    ii, jj, ss = np.asarray(nl.i), np.asarray(nl.j), np.asarray(nl.shifts)
    ff, hh = d < rc, d < h_cutoff
    hi, hj, hs = ii[hh], jj[hh], ss[hh]
    lay = np.asarray(layers if layers is not None else assign_layers(atoms), dtype=np.int64)
    zs = [atomic_numbers[s] for s in species]
    f64, i64 = torch.float64, torch.int64
    return DPGraph(
        species=torch.as_tensor(species_index(atoms.numbers, zs), dtype=i64),
        positions=torch.as_tensor(atoms.positions, dtype=f64),
        cell=torch.as_tensor(np.asarray(atoms.cell)[None], dtype=f64),
        batch=torch.zeros(len(atoms), dtype=i64),
        layer=torch.as_tensor(lay, dtype=i64),
        layer_feat=torch.as_tensor(layer_features(atoms, lay, areal_density), dtype=f64),
        ff_i=torch.as_tensor(ii[ff], dtype=i64), ff_j=torch.as_tensor(jj[ff], dtype=i64),
        ff_shift=torch.as_tensor(ss[ff].reshape(-1, 3), dtype=f64),
        h_i=torch.as_tensor(hi, dtype=i64), h_j=torch.as_tensor(hj, dtype=i64),
        h_shift=torch.as_tensor(hs.reshape(-1, 3), dtype=f64),
        h_rev=torch.as_tensor(reverse_edges(hi, hj, hs), dtype=i64),
        natoms=torch.tensor([len(atoms)], dtype=i64),
        volume=torch.tensor([abs(atoms.cell.volume)], dtype=f64),
    )


def batch_graphs(graphs: Sequence[DPGraph]) -> DPGraph:
    """Concatenate single-structure graphs into one batch (indices offset)."""
    if len(graphs) == 1:
        return graphs[0]
    out: dict[str, list] = {f.name: [] for f in fields(DPGraph)}
    n0 = h0 = l0 = 0
    for b, g in enumerate(graphs):
        n = len(g.species)
        for f in fields(DPGraph):
            t = getattr(g, f.name)
            if f.name in ("ff_i", "ff_j", "h_i", "h_j"):
                t = t + n0
            elif f.name == "h_rev":
                t = t + h0
            elif f.name == "layer":
                t = t + l0
            elif f.name == "batch":
                t = torch.full_like(t, b)
            out[f.name].append(t)
        n0 += n
        h0 += len(g.h_i)
        l0 += len(g.layer_feat)
    return DPGraph(**{k: torch.cat(v) for k, v in out.items()})


def build_graph(structures: Sequence[Atoms], species: Sequence[str], rc: float,
                h_cutoff: float, areal_density: float, min_distance: float = 0.0,
                layers: Sequence[np.ndarray] | None = None) -> DPGraph:
    """One batched DPGraph of several structures (see :func:`structure_graph`)."""
    return batch_graphs([
        structure_graph(a, species, rc, h_cutoff, areal_density, min_distance,
                        None if layers is None else layers[b])
        for b, a in enumerate(structures)])
