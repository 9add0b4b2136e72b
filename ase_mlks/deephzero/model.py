"""E(3)-equivariant Hamiltonian network in the DeepH-E3 style (e3nn 0.6).

Atoms are nodes, atom pairs within ``cutoff`` (periodic images included) are edges. Node
features (irreps of O(3), both parities) are updated by equivariant message passing
(tensor products of neighbour features with spherical harmonics of the bond direction,
weighted by a radial MLP, then a gated nonlinearity). On-site blocks H_ii come from node
features, hopping blocks H_ij(R) from edge features; each block is assembled from one irrep
(L, (-1)^(l1+l2)) per shell pair and L in |l1-l2|..l1+l2 by Clebsch-Gordan coupling
(Wigner-Eckart theorem), so rotating the structure rotates H by the basis's Wigner-D matrices.
Locality: only neighbours within the cutoff enter, so the same weights apply to any size.

Units: positions Å, Hamiltonian Hartree (the engine's unit); orbital order as
``ase_mlks.core.orbitals`` (PySCF's p order is converted in the engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate

from ..core.checkpoint import CheckpointMixin
from ..core.graph import neighbor_list, species_index
from ..core.orbitals import OrbitalBasis, e3nn_to_ours

DEFAULT_HIDDEN = "16x0e+4x0o+8x1o+4x1e+4x2e+4x2o+2x3o+2x3e+2x4e"


# -- structure -> graph ---------------------------------------------------------------------
@dataclass
class Graph:
    """A batch of structures as one graph (numpy index arrays, torch float64 geometry)."""

    species: torch.Tensor      # (natoms,) index into model species
    numbers: np.ndarray        # (natoms,)
    src: torch.Tensor          # (nedges,) i of edge i -> j (atom index in the batch)
    dst: torch.Tensor          # (nedges,) j
    shifts: np.ndarray         # (nedges, 3) integer cell shift of j
    vectors: torch.Tensor      # (nedges, 3) r_j + S.cell - r_i (Å)
    atom_struct: np.ndarray    # (natoms,) structure index
    atom_offset: np.ndarray    # (nstruct+1,) first atom of each structure
    cells: list[np.ndarray]    # per structure (3, 3) Å
    pbc: list[bool]


def build_graph(atoms_list: list[Atoms], cutoff: float, species: list[int],
                positions: list[torch.Tensor] | None = None) -> Graph:
    """Batch graph of several structures. ``positions`` may override (for autograd tests)."""
    src, dst, shifts, vecs, spc, nums, astruct = [], [], [], [], [], [], []
    offset = 0
    offsets = [0]
    for s, atoms in enumerate(atoms_list):
        nl = neighbor_list(atoms, cutoff)
        pos = (positions[s] if positions is not None
               else torch.as_tensor(atoms.positions, dtype=torch.float64))
        cell = torch.as_tensor(np.asarray(atoms.cell[:]), dtype=torch.float64)
        i = torch.as_tensor(nl.i)
        j = torch.as_tensor(nl.j)
        sh = torch.as_tensor(nl.shifts, dtype=torch.float64)
        vecs.append(pos[j] - pos[i] + sh @ cell)
        src.append(nl.i + offset)
        dst.append(nl.j + offset)
        shifts.append(nl.shifts)
        spc.append(species_index(atoms.numbers, species))
        nums.append(atoms.numbers)
        astruct.append(np.full(len(atoms), s))
        offset += len(atoms)
        offsets.append(offset)
    return Graph(species=torch.as_tensor(np.concatenate(spc)), numbers=np.concatenate(nums),
                 src=torch.as_tensor(np.concatenate(src)), dst=torch.as_tensor(np.concatenate(dst)),
                 shifts=np.concatenate(shifts).reshape(-1, 3),
                 vectors=torch.cat(vecs).reshape(-1, 3),
                 atom_struct=np.concatenate(astruct), atom_offset=np.asarray(offsets),
                 cells=[np.asarray(a.cell[:]) for a in atoms_list],
                 pbc=[bool(np.any(a.pbc)) for a in atoms_list])


# -- Wigner-Eckart coupling ---------------------------------------------------------------
def block_irreps(basis: OrbitalBasis, zi: int, zj: int) -> tuple[o3.Irreps, np.ndarray]:
    """Irreps of the (zi, zj) block and the coupling matrix W (dim, ni*nj): block = x @ W."""
    shells_i, shells_j = basis.shells_of(zi), basis.shells_of(zj)
    ni, nj = basis.norb(zi), basis.norb(zj)
    irreps = []
    cols = []
    oa = 0
    for sa in shells_i:
        ob = 0
        for sb in shells_j:
            la, lb = sa.l, sb.l
            pa, pb = e3nn_to_ours(la), e3nn_to_ours(lb)
            for L in range(abs(la - lb), la + lb + 1):
                irreps.append((1, (L, (-1) ** (la + lb))))
                w = o3.wigner_3j(la, lb, L, dtype=torch.float64).numpy() * np.sqrt(2 * L + 1)
                for M in range(2 * L + 1):
                    blk = np.zeros((ni, nj))
                    blk[oa:oa + 2 * la + 1, ob:ob + 2 * lb + 1] = pa @ w[:, :, M] @ pb.T
                    cols.append(blk.ravel())
            ob += sb.size
        oa += sa.size
    return o3.Irreps(irreps), np.stack(cols)


def _gate(irreps_out: o3.Irreps) -> Gate:
    scalars = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l > 0])
    acts = [torch.nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars]
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    return Gate(scalars, acts, gates, [torch.sigmoid] * len(gates), gated)


class Interaction(torch.nn.Module):
    """One message-passing layer: x_i <- gate(W x_i + sum_j TP(x_j, Y(r_ij); R(|r_ij|)))."""

    def __init__(self, irreps_in: o3.Irreps, irreps_hidden: o3.Irreps, irreps_sh: o3.Irreps,
                 n_radial: int, radial_hidden: int, avg_neighbors: float):
        super().__init__()
        self.gate = _gate(irreps_hidden)
        self.tp = o3.FullyConnectedTensorProduct(irreps_in, irreps_sh, self.gate.irreps_in,
                                                 shared_weights=False, internal_weights=False)
        self.radial = FullyConnectedNet([n_radial, radial_hidden, self.tp.weight_numel],
                                        torch.nn.functional.silu)
        self.self_linear = o3.Linear(irreps_in, self.gate.irreps_in)
        self.avg = avg_neighbors
        self.residual = o3.Irreps(irreps_in) == self.gate.irreps_out

    def forward(self, x, src, dst, sh, rad):
        msg = self.tp(x[dst], sh, self.radial(rad))
        agg = torch.zeros(x.shape[0], msg.shape[1], dtype=msg.dtype).index_add_(0, src, msg)
        out = self.gate(self.self_linear(x) + agg / self.avg ** 0.5)
        return out + x if self.residual else out


class DeepHE3(torch.nn.Module, CheckpointMixin):
    """Structure -> H_theta blocks (Hartree). See the module docstring.

    Parameters: ``basis`` {element: [shell names]} (from the engine), ``cutoff`` (Å) of
    the graph, ``hidden`` irreps, ``layers`` message-passing steps, ``lmax`` of the
    spherical harmonics, ``n_radial`` Bessel functions, ``engine`` (the level of theory,
    recorded in the checkpoint), ``sigma`` smearing (Ha) the model was trained with.
    """

    pretrained_prefix = "deephzero-"

    def __init__(self, basis: dict, cutoff: float = 5.0, hidden: str = DEFAULT_HIDDEN,
                 layers: int = 2, lmax: int = 4, n_radial: int = 12, radial_hidden: int = 32,
                 avg_neighbors: float = 2.0, engine: dict | None = None, sigma: float = 0.01):
        super().__init__()
        # e3nn computes its Clebsch-Gordan buffers in the default dtype: build in float64
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            self._build(basis, cutoff, hidden, layers, lmax, n_radial, radial_hidden,
                        avg_neighbors, engine, sigma)
        finally:
            torch.set_default_dtype(previous)

    def _build(self, basis, cutoff, hidden, layers, lmax, n_radial, radial_hidden,
               avg_neighbors, engine, sigma) -> None:
        self.hparams = {"basis": basis, "cutoff": cutoff, "hidden": hidden, "layers": layers,
                        "lmax": lmax, "n_radial": n_radial, "radial_hidden": radial_hidden,
                        "avg_neighbors": avg_neighbors, "engine": engine, "sigma": sigma}
        self.basis = OrbitalBasis(basis)
        self.species = self.basis.elements
        self.cutoff = float(cutoff)
        self.engine_description = engine
        self.sigma = sigma
        self.n_radial = n_radial
        hid = o3.Irreps(hidden)
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        nsp = len(self.species)
        self.embed = o3.Linear(o3.Irreps(f"{nsp}x0e"), o3.Irreps(f"{hid.count('0e')}x0e"))
        irreps = o3.Irreps(f"{hid.count('0e')}x0e")
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            layer = Interaction(irreps, hid, self.irreps_sh, n_radial, radial_hidden,
                                avg_neighbors)
            self.layers.append(layer)
            irreps = layer.gate.irreps_out
        self.irreps_node = irreps
        # edge features: TP of (x_i + x_j, x_i - x_j) with Y(r_ij), radial weights
        self.edge_gate = _gate(hid)
        self.edge_tp = o3.FullyConnectedTensorProduct(irreps + irreps, self.irreps_sh,
                                                      self.edge_gate.irreps_in,
                                                      shared_weights=False,
                                                      internal_weights=False)
        self.edge_radial = FullyConnectedNet([n_radial, radial_hidden, self.edge_tp.weight_numel],
                                             torch.nn.functional.silu)
        self.onsite_heads = torch.nn.ModuleDict()
        self.hop_heads = torch.nn.ModuleDict()
        self._coupling: dict[str, torch.Tensor] = {}
        for zi in self.species:
            ir, w = block_irreps(self.basis, zi, zi)
            self.onsite_heads[str(zi)] = o3.Linear(irreps, ir, biases=True)
            self.register_buffer(f"W_{zi}_{zi}", torch.from_numpy(w))
            for zj in self.species:
                ir, w = block_irreps(self.basis, zi, zj)
                self.hop_heads[f"{zi}_{zj}"] = o3.Linear(self.edge_gate.irreps_out, ir,
                                                         biases=True)
                if zi != zj:
                    self.register_buffer(f"W_{zi}_{zj}", torch.from_numpy(w))
        # Zero last layers: training starts from H = on-site biases (the atomic guess), not
        # from random blocks of tens of Hartree.
        for head in [*self.onsite_heads.values(), *self.hop_heads.values()]:
            torch.nn.init.zeros_(head.weight)
        self.double()

    # -- features ---------------------------------------------------------------------
    def _radial(self, d: torch.Tensor) -> torch.Tensor:
        return soft_one_hot_linspace(d, 0.0, self.cutoff, self.n_radial, basis="bessel",
                                     cutoff=True) * self.n_radial ** 0.5

    def forward(self, g: Graph) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """On-site blocks per atom (ni, ni) and hopping blocks per edge (ni, nj), Hartree."""
        onehot = torch.nn.functional.one_hot(g.species, len(self.species)).to(torch.float64)
        x = self.embed(onehot)
        d = g.vectors.norm(dim=1)
        sh = o3.spherical_harmonics(self.irreps_sh, g.vectors, normalize=True,
                                    normalization="component")
        rad = self._radial(d)
        for layer in self.layers:
            x = layer(x, g.src, g.dst, sh, rad)
        xi, xj = x[g.src], x[g.dst]
        e = self.edge_gate(self.edge_tp(torch.cat([xi + xj, xi - xj], dim=1), sh,
                                        self.edge_radial(rad)))
        onsite: list[torch.Tensor | None] = [None] * len(g.numbers)
        hops: list[torch.Tensor | None] = [None] * len(g.src)
        for zi in self.species:
            idx = np.nonzero(g.numbers == zi)[0]
            if len(idx):
                n = self.basis.norb(zi)
                vals = self.onsite_heads[str(zi)](x[idx]) @ getattr(self, f"W_{zi}_{zi}")
                for k, a in enumerate(idx):
                    onsite[a] = vals[k].reshape(n, n)
        zsrc, zdst = g.numbers[g.src.numpy()], g.numbers[g.dst.numpy()]
        for zi in self.species:
            for zj in self.species:
                idx = np.nonzero((zsrc == zi) & (zdst == zj))[0]
                if len(idx):
                    w = getattr(self, f"W_{zi}_{zj}")
                    vals = self.hop_heads[f"{zi}_{zj}"](e[idx]) @ w
                    ni, nj = self.basis.norb(zi), self.basis.norb(zj)
                    for k, a in enumerate(idx):
                        hops[a] = vals[k].reshape(ni, nj)
        return onsite, hops  # type: ignore[return-value]

    # -- assembly ---------------------------------------------------------------------
    def hamiltonian_k(self, g: Graph, kpts: list[np.ndarray] | None = None
                      ) -> list[torch.Tensor]:
        """H(k) per structure, shape (nk, n, n): Bloch sums of the blocks at fractional k
        (molecules: (1, n, n) real). Hermitian by construction ((H + H^H) / 2)."""
        onsite, hops = self(g)
        return assemble_k(self.basis, g, onsite, hops, kpts)

    def initialize_onsite(self, g: Graph, h_guess: list[np.ndarray]) -> None:
        """Set the on-site scalar biases from a label-free guess H (e.g. F of atomic densities).

        Projects each atom's guess block on the coupling basis and averages the L = 0
        components per element: the network then starts at the right energy scale.
        """
        with torch.no_grad():
            for zi in self.species:
                rows = []
                w = getattr(self, f"W_{zi}_{zi}").numpy()
                for a in np.nonzero(g.numbers == zi)[0]:
                    s = g.atom_struct[a]
                    sl = self.basis.orbital_slices(
                        g.numbers[g.atom_offset[s]:g.atom_offset[s + 1]])[a - g.atom_offset[s]]
                    blk = np.real(h_guess[s][0][sl, sl])
                    rows.append(np.linalg.lstsq(w.T, blk.ravel(), rcond=None)[0])
                if not rows:
                    continue
                x = np.mean(rows, axis=0)
                head = self.onsite_heads[str(zi)]
                ir = head.irreps_out
                scalars = [x[sl] for (_, irr), sl in zip(ir, ir.slices())
                           if irr == o3.Irrep("0e")]
                head.bias.copy_(torch.as_tensor(np.concatenate(scalars)))


def assemble_k(basis: OrbitalBasis, g: Graph, onsite, hops, kpts=None) -> list[torch.Tensor]:
    """Scatter blocks into dense H(k) per structure (see ``DeepHE3.hamiltonian_k``)."""
    out = []
    src, dst = g.src.numpy(), g.dst.numpy()
    for s in range(len(g.atom_offset) - 1):
        a0, a1 = g.atom_offset[s], g.atom_offset[s + 1]
        nums = g.numbers[a0:a1]
        off = basis.orbital_offsets(nums)
        n = int(off[-1])
        k = np.zeros((1, 3)) if (kpts is None or kpts[s] is None) else np.asarray(kpts[s])
        periodic = g.pbc[s]
        dtype = torch.complex128 if periodic else torch.float64
        H = torch.zeros((len(k), n, n), dtype=dtype)
        for a in range(a0, a1):
            sl = slice(off[a - a0], off[a - a0 + 1])
            H[:, sl, sl] = H[:, sl, sl] + onsite[a].to(dtype)
        edges = np.nonzero((src >= a0) & (src < a1))[0]
        if len(edges):
            if periodic:
                phase = torch.as_tensor(np.exp(2j * np.pi * g.shifts[edges] @ k.T))  # (E, nk)
            for col, e in enumerate(edges):
                i, j = src[e] - a0, dst[e] - a0
                si, sj = slice(off[i], off[i + 1]), slice(off[j], off[j + 1])
                blk = hops[e]
                if periodic:
                    H[:, si, sj] = H[:, si, sj] + phase[col][:, None, None] * blk.to(dtype)
                else:
                    H[:, si, sj] = H[:, si, sj] + blk
        out.append(0.5 * (H + H.mH))
    return out


__all__ = ["DeepHE3", "Graph", "build_graph", "block_irreps", "assemble_k"]
