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


def _uvu_tensor_product(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, targets: o3.Irreps
                        ) -> o3.TensorProduct:
    """Depthwise ('uvu') tensor product x ⊗ Y: every input channel is coupled with each
    spherical harmonic to every output irrep that ``targets`` contains; weights per path and
    channel (given per edge by a radial network). NequIP's convolution: its weight count is
    sum(mul_in) per path, not mul_in * mul_out as in a fully connected product, which keeps
    the per-edge weights and their backward cheap at wide feature multiplicities."""
    wanted = {ir for _, ir in targets}
    mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in wanted:
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir_out))
    mid = o3.Irreps(mid)
    return o3.TensorProduct(irreps_in, irreps_sh, mid, instructions, shared_weights=False,
                            internal_weights=False)


class InteractionUVU(torch.nn.Module):
    """Message passing with a depthwise convolution (NequIP / DeepH-E3 style):
    x_i <- x_i + gate(W_self x_i + W_out sum_j TP_uvu(W_in x_j, Y(r_ij); R(|r_ij|)))."""

    def __init__(self, irreps_in: o3.Irreps, irreps_hidden: o3.Irreps, irreps_sh: o3.Irreps,
                 n_radial: int, radial_hidden: int, avg_neighbors: float):
        super().__init__()
        self.gate = _gate(irreps_hidden)
        self.lin_in = o3.Linear(irreps_in, irreps_in)
        self.tp = _uvu_tensor_product(o3.Irreps(irreps_in), irreps_sh, self.gate.irreps_in)
        self.radial = FullyConnectedNet([n_radial, radial_hidden, radial_hidden,
                                         self.tp.weight_numel], torch.nn.functional.silu)
        self.lin_out = o3.Linear(self.tp.irreps_out, self.gate.irreps_in)
        self.self_linear = o3.Linear(irreps_in, self.gate.irreps_in)
        self.avg = avg_neighbors
        self.residual = o3.Irreps(irreps_in) == self.gate.irreps_out

    def forward(self, x, src, dst, sh, rad):
        msg = self.tp(self.lin_in(x)[dst], sh, self.radial(rad))
        agg = torch.zeros(x.shape[0], msg.shape[1], dtype=msg.dtype).index_add_(0, src, msg)
        out = self.gate(self.self_linear(x) + self.lin_out(agg) / self.avg ** 0.5)
        return out + x if self.residual else out


class DeepHE3(torch.nn.Module, CheckpointMixin):
    """Structure -> H_theta blocks (Hartree). See the module docstring.

    Parameters: ``basis`` {element: [shell names]} (from the engine), ``cutoff`` (Å) of
    the graph, ``hidden`` irreps, ``layers`` message-passing steps, ``lmax`` of the
    spherical harmonics, ``n_radial`` Bessel functions, ``engine`` (the level of theory,
    recorded in the checkpoint), ``sigma`` smearing (Ha) the model was trained with,
    ``conv`` the convolution: ``"uvu"`` (depthwise, NequIP-style; cheap at wide features)
    or ``"fc"`` (fully connected tensor products, the first shipped water model's).
    """

    pretrained_prefix = "deephzero-"

    def __init__(self, basis: dict, cutoff: float = 5.0, hidden: str = DEFAULT_HIDDEN,
                 layers: int = 2, lmax: int = 4, n_radial: int = 12, radial_hidden: int = 32,
                 avg_neighbors: float = 2.0, engine: dict | None = None, sigma: float = 0.01,
                 conv: str = "uvu"):
        super().__init__()
        if conv not in ("uvu", "fc"):
            raise ValueError(f"conv must be 'uvu' or 'fc', got {conv!r}")
        # e3nn computes its Clebsch-Gordan buffers in the default dtype: build in float64
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            self._build(basis, cutoff, hidden, layers, lmax, n_radial, radial_hidden,
                        avg_neighbors, engine, sigma, conv)
        finally:
            torch.set_default_dtype(previous)

    @staticmethod
    def upgrade_hparams(hparams: dict) -> dict:
        """Checkpoints written before ``conv`` existed hold the fully connected network."""
        hparams.setdefault("conv", "fc")
        return hparams

    def _build(self, basis, cutoff, hidden, layers, lmax, n_radial, radial_hidden,
               avg_neighbors, engine, sigma, conv) -> None:
        self.hparams = {"basis": basis, "cutoff": cutoff, "hidden": hidden, "layers": layers,
                        "lmax": lmax, "n_radial": n_radial, "radial_hidden": radial_hidden,
                        "avg_neighbors": avg_neighbors, "engine": engine, "sigma": sigma,
                        "conv": conv}
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
        layer_class = InteractionUVU if conv == "uvu" else Interaction
        for _ in range(layers):
            layer = layer_class(irreps, hid, self.irreps_sh, n_radial, radial_hidden,
                                avg_neighbors)
            self.layers.append(layer)
            irreps = layer.gate.irreps_out
        self.irreps_node = irreps
        # edge features: TP of (x_i + x_j, x_i - x_j) with Y(r_ij), radial weights
        self.edge_gate = _gate(hid)
        if conv == "uvu":
            self.edge_tp = _uvu_tensor_product(irreps + irreps, self.irreps_sh,
                                               self.edge_gate.irreps_in)
            self.edge_out = o3.Linear(self.edge_tp.irreps_out, self.edge_gate.irreps_in)
            radial_sizes = [n_radial, radial_hidden, radial_hidden, self.edge_tp.weight_numel]
        else:
            self.edge_tp = o3.FullyConnectedTensorProduct(irreps + irreps, self.irreps_sh,
                                                          self.edge_gate.irreps_in,
                                                          shared_weights=False,
                                                          internal_weights=False)
            self.edge_out = torch.nn.Identity()
            radial_sizes = [n_radial, radial_hidden, self.edge_tp.weight_numel]
        self.edge_radial = FullyConnectedNet(radial_sizes, torch.nn.functional.silu)
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
        if conv == "uvu":  # output scales per block component (initialize_from_guess)
            for zi in self.species:
                self.register_buffer(f"scale_on_{zi}", torch.ones(
                    self.onsite_heads[str(zi)].irreps_out.dim))
                for zj in self.species:
                    self.register_buffer(f"scale_hop_{zi}_{zj}", torch.ones(
                        self.hop_heads[f"{zi}_{zj}"].irreps_out.dim))
        # Zero last layers: training starts from H = on-site biases (the atomic guess), not
        # from random blocks of tens of Hartree.
        for head in [*self.onsite_heads.values(), *self.hop_heads.values()]:
            torch.nn.init.zeros_(head.weight)
        self.double()

    # -- features ---------------------------------------------------------------------
    def _radial(self, d: torch.Tensor) -> torch.Tensor:
        return soft_one_hot_linspace(d, 0.0, self.cutoff, self.n_radial, basis="bessel",
                                     cutoff=True) * self.n_radial ** 0.5

    def features(self, g: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        """Node features (natoms, dim) after message passing and edge features (nedges, dim)."""
        onehot = torch.nn.functional.one_hot(g.species, len(self.species)).to(torch.float64)
        x = self.embed(onehot)
        d = g.vectors.norm(dim=1)
        sh = o3.spherical_harmonics(self.irreps_sh, g.vectors, normalize=True,
                                    normalization="component")
        rad = self._radial(d)
        for layer in self.layers:
            x = layer(x, g.src, g.dst, sh, rad)
        xi, xj = x[g.src], x[g.dst]
        e = self.edge_gate(self.edge_out(self.edge_tp(torch.cat([xi + xj, xi - xj], dim=1), sh,
                                                      self.edge_radial(rad))))
        return x, e

    def forward(self, g: Graph) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """On-site blocks per atom (ni, ni) and hopping blocks per edge (ni, nj), Hartree."""
        on_flat, hop_flat = self._scatter_blocks(g, *self.features(g))
        return _split_blocks(self.basis, g, on_flat, hop_flat)

    def _scaled(self, key: str, out: torch.Tensor) -> torch.Tensor:
        scale = getattr(self, f"scale_{key}", None)
        return out if scale is None else out * scale

    def _scatter_blocks(self, g: Graph, x: torch.Tensor, e: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """All on-site blocks and all hopping blocks, each flattened row-major and
        concatenated in atom / edge order (shapes (sum ni^2,), (sum ni nj,)).

        One head call and one index_add per element (pair) type: slicing per atom or per edge
        would make every backward step allocate a full-size zero gradient (O(E^2) time).
        """
        lay = _layout(self.basis, g)
        on_flat = x.new_zeros(int(lay.on_off[-1]))
        hop_flat = x.new_zeros(int(lay.hop_off[-1]))
        for zi in self.species:
            idx = np.nonzero(g.numbers == zi)[0]
            if len(idx):
                vals = self._scaled(f"on_{zi}", self.onsite_heads[str(zi)](x[idx])) \
                    @ getattr(self, f"W_{zi}_{zi}")
                pos = lay.on_off[idx][:, None] + np.arange(vals.shape[1])[None, :]
                on_flat = on_flat.index_add(0, torch.as_tensor(pos.ravel()), vals.reshape(-1))
        zsrc, zdst = g.numbers[g.src.numpy()], g.numbers[g.dst.numpy()]
        for zi in self.species:
            for zj in self.species:
                idx = np.nonzero((zsrc == zi) & (zdst == zj))[0]
                if len(idx):
                    vals = self._scaled(f"hop_{zi}_{zj}", self.hop_heads[f"{zi}_{zj}"](e[idx])) \
                        @ getattr(self, f"W_{zi}_{zj}")
                    pos = lay.hop_off[idx][:, None] + np.arange(vals.shape[1])[None, :]
                    hop_flat = hop_flat.index_add(0, torch.as_tensor(pos.ravel()),
                                                  vals.reshape(-1))
        return on_flat, hop_flat

    # -- assembly ---------------------------------------------------------------------
    def hamiltonian_k(self, g: Graph, kpts: list[np.ndarray] | None = None
                      ) -> list[torch.Tensor]:
        """H(k) per structure, shape (nk, n, n): Bloch sums of the blocks at fractional k
        (molecules: (1, n, n) real). Hermitian by construction ((H + H^H) / 2)."""
        on_flat, hop_flat = self._scatter_blocks(g, *self.features(g))
        return assemble_k_flat(self.basis, g, on_flat, hop_flat, kpts)

    def initialize_from_guess(self, g: Graph, h_guess: list[np.ndarray]) -> None:
        """Set output biases and scales from a label-free guess H (F of atomic densities).

        Each guess block is projected on its coupling basis (block = x @ W). On-site heads:
        the mean of every L = 0 component becomes its bias (the network starts at the
        right energy levels). uvu models also get a per-component output scale, the RMS of
        that component over the guess blocks (molecules only: a periodic guess is H(k), not
        blocks): e3nn's normalized linear heads emit O(1) numbers, and hopping components
        of ~1 Ha would otherwise need weights that Adam grows only by ~lr per step.
        """
        on_rows: dict[int, list] = {z: [] for z in self.species}
        hop_rows: dict[tuple[int, int], list] = {}
        src, dst = g.src.numpy(), g.dst.numpy()
        for s in range(len(g.atom_offset) - 1):
            a0, a1 = g.atom_offset[s], g.atom_offset[s + 1]
            sl = self.basis.orbital_slices(g.numbers[a0:a1])
            # R = 0 term of H(k) on a uniform mesh: the mean over k (the Gamma block would add
            # every image's hopping to the on-site levels: -0.43 instead of -0.02 Ha for the
            # diffuse Na 3s)
            h = np.real(np.mean(h_guess[s], axis=0))
            for a in range(a0, a1):
                on_rows[int(g.numbers[a])].append(h[sl[a - a0], sl[a - a0]].ravel())
            if g.pbc[s]:
                continue
            for e in np.nonzero((src >= a0) & (src < a1))[0]:
                key = (int(g.numbers[src[e]]), int(g.numbers[dst[e]]))
                hop_rows.setdefault(key, []).append(h[sl[src[e] - a0], sl[dst[e] - a0]].ravel())
        with torch.no_grad():
            for zi in self.species:
                if not on_rows[zi]:
                    continue
                w = getattr(self, f"W_{zi}_{zi}").numpy()
                comp = np.linalg.lstsq(w.T, np.array(on_rows[zi]).T, rcond=None)[0].T
                head = self.onsite_heads[str(zi)]
                scale = self._set_scale(f"on_{zi}", comp, head.irreps_out)
                mean = comp.mean(axis=0) / scale
                scalars = [mean[sl] for (_, irr), sl in zip(head.irreps_out,
                                                            head.irreps_out.slices())
                           if irr == o3.Irrep("0e")]
                head.bias.copy_(torch.as_tensor(np.concatenate(scalars)))
            for (zi, zj), rows in hop_rows.items():
                w = getattr(self, f"W_{zi}_{zj}").numpy()
                comp = np.linalg.lstsq(w.T, np.array(rows).T, rcond=None)[0].T
                self._set_scale(f"hop_{zi}_{zj}", comp, self.hop_heads[f"{zi}_{zj}"].irreps_out)

    def _set_scale(self, key: str, comp: np.ndarray, irreps: o3.Irreps) -> np.ndarray:
        """Per-component RMS of ``comp`` (nblocks, dim), shared within each irrep, into
        buffer ``scale_<key>`` (uvu models); returns the scale in use (ones for 'fc')."""
        if not hasattr(self, f"scale_{key}"):
            return np.ones(comp.shape[1])
        scale = np.ones(comp.shape[1])
        for sl in irreps.slices():
            rms = float(np.sqrt(np.mean(comp[:, sl] ** 2)))
            scale[sl] = max(rms, 1e-4)
        getattr(self, f"scale_{key}").copy_(torch.as_tensor(scale))
        return scale

    # kept for scripts written against the first release
    initialize_onsite = initialize_from_guess


def aliased_hoppings(g: Graph, kmesh: tuple[int, int, int]) -> int:
    """Number of hoppings H_ij(R) that a k-mesh cannot tell apart from another edge of the
    same pair: R' = R + (n1 N1, n2 N2, n3 N3). On the mesh e^{2 pi i k.R} = e^{2 pi i k.R'}, so
    a loss evaluated only at the mesh's k-points fixes their sum, never the two values, and
    bands between mesh points come out wrong (the graphene test: 7 eV off the 3x3 mesh).
    Zero when the Born-von Karman supercell exceeds twice the graph cutoff."""
    mesh = np.asarray(kmesh, dtype=np.int64)
    keys = np.column_stack([g.src.numpy(), g.dst.numpy(), np.mod(g.shifts, mesh)])
    _, counts = np.unique(keys, axis=0, return_counts=True)
    return int(np.sum(counts[counts > 1]))


@dataclass
class _Layout:
    """Where each atom's on-site block and each edge's hopping block start in the flat
    block vectors (``on_off`` (natoms+1,), ``hop_off`` (nedges+1,)), and the block shapes."""

    on_off: np.ndarray
    hop_off: np.ndarray
    norb: np.ndarray       # (natoms,) orbitals per atom


def _layout(basis: OrbitalBasis, g: Graph) -> _Layout:
    norb = np.array([basis.norb(int(z)) for z in g.numbers], dtype=np.int64)
    src, dst = g.src.numpy(), g.dst.numpy()
    on_off = np.concatenate([[0], np.cumsum(norb ** 2)]).astype(np.int64)
    hop_off = np.concatenate([[0], np.cumsum(norb[src] * norb[dst])]).astype(np.int64)
    return _Layout(on_off, hop_off, norb)


def _split_blocks(basis: OrbitalBasis, g: Graph, on_flat: torch.Tensor, hop_flat: torch.Tensor
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Flat block vectors -> lists of (ni, ni) on-site and (ni, nj) hopping blocks (views)."""
    lay = _layout(basis, g)
    src, dst = g.src.numpy(), g.dst.numpy()
    onsite = [b.reshape(int(n), int(n)) for b, n in
              zip(torch.split(on_flat, list(np.diff(lay.on_off))), lay.norb)]
    hops = [b.reshape(int(lay.norb[i]), int(lay.norb[j])) for b, i, j in
            zip(torch.split(hop_flat, list(np.diff(lay.hop_off))), src, dst)]
    return onsite, hops


def _block_positions(r0: np.ndarray, c0: np.ndarray, nr: np.ndarray, nc: np.ndarray,
                     n: int) -> np.ndarray:
    """Flat indices (row * n + col) in an (n, n) matrix of every element of the blocks
    whose top-left corners are (r0, c0) and shapes (nr, nc), blocks in order, each
    row-major: the order in which the flat block vectors store them."""
    size = nr * nc
    within = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    ncol = np.repeat(nc, size)
    return (np.repeat(r0, size) + within // ncol) * n + np.repeat(c0, size) + within % ncol


def assemble_k_flat(basis: OrbitalBasis, g: Graph, on_flat: torch.Tensor,
                    hop_flat: torch.Tensor, kpts=None) -> list[torch.Tensor]:
    """Dense H(k) per structure from the flat block vectors, by one scatter per structure.

    Returns per structure (nk, n, n): complex Bloch sums at fractional ``kpts[s]`` for
    periodic structures, (1, n, n) real for molecules; Hermitian ((H + H^H) / 2).
    """
    lay = _layout(basis, g)
    src, dst = g.src.numpy(), g.dst.numpy()
    nstruct = len(g.atom_offset) - 1
    edge_struct = g.atom_struct[src] if len(src) else np.zeros(0, np.int64)
    on_parts = torch.split(on_flat, [int(lay.on_off[g.atom_offset[s + 1]]
                                         - lay.on_off[g.atom_offset[s]])
                                     for s in range(nstruct)])
    ecount = np.bincount(edge_struct, minlength=nstruct)
    eoff = np.concatenate([[0], np.cumsum(ecount)])
    hop_parts = torch.split(hop_flat, [int(lay.hop_off[eoff[s + 1]] - lay.hop_off[eoff[s]])
                                       for s in range(nstruct)])
    out = []
    for s in range(nstruct):
        a0, a1 = g.atom_offset[s], g.atom_offset[s + 1]
        aoff = basis.orbital_offsets(g.numbers[a0:a1])
        n = int(aoff[-1])
        k = np.zeros((1, 3)) if (kpts is None or kpts[s] is None) else np.asarray(kpts[s])
        nk = len(k)
        norb = lay.norb[a0:a1]
        on_pos = _block_positions(aoff[:-1], aoff[:-1], norb, norb, n)
        edges = np.arange(eoff[s], eoff[s + 1])
        i, j = src[edges] - a0, dst[edges] - a0
        hop_pos = _block_positions(aoff[i], aoff[j], norb[i], norb[j], n)
        elem_edge = np.repeat(np.arange(len(edges)), norb[i] * norb[j])
        if g.pbc[s]:
            phase = torch.as_tensor(np.exp(2j * np.pi * g.shifts[edges] @ k.T))  # (E, nk)
            vals = hop_parts[s].to(torch.complex128)[None, :] * phase[elem_edge].T
            flat = torch.zeros(nk * n * n, dtype=torch.complex128)
            kshift = (np.arange(nk) * n * n)[:, None]
            flat = flat.index_add(0, torch.as_tensor((kshift + hop_pos[None]).ravel()),
                                  vals.reshape(-1))
            flat = flat.index_add(0, torch.as_tensor((kshift + on_pos[None]).ravel()),
                                  on_parts[s].to(torch.complex128).repeat(nk))
        else:
            flat = torch.zeros(n * n, dtype=torch.float64)
            flat = flat.index_add(0, torch.as_tensor(hop_pos), hop_parts[s])
            flat = flat.index_add(0, torch.as_tensor(on_pos), on_parts[s])
        H = flat.reshape(nk, n, n)
        out.append(0.5 * (H + H.mH))
    return out


def assemble_k(basis: OrbitalBasis, g: Graph, onsite, hops, kpts=None) -> list[torch.Tensor]:
    """Dense H(k) per structure from lists of blocks (see ``assemble_k_flat``)."""
    on_flat = torch.cat([b.reshape(-1) for b in onsite])
    hop_flat = (torch.cat([b.reshape(-1) for b in hops]) if len(hops)
                else on_flat.new_zeros(0))
    return assemble_k_flat(basis, g, on_flat, hop_flat, kpts)


__all__ = ["DeepHE3", "Graph", "build_graph", "block_irreps", "assemble_k", "assemble_k_flat",
           "aliased_hoppings"]
