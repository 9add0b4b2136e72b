"""Deep Potential smooth-edition descriptor (DeePMD "se_e2_a"), written for edge lists.

For a centre atom i and each neighbour j inside the cutoff ``rc`` the environment row is

    R_ij = s(r_ij) * (1, x_ij / r, y_ij / r, z_ij / r),   s(r) = sw(r) / r,

the smooth version of the paper's (1/R, x/R^2, y/R^2, z/R^2): ``sw`` switches 1 -> 0
between ``rcs`` and ``rc`` with a C2 quintic, so energies and forces stay continuous when
neighbours cross the cutoff. An embedding network G(s) (M1 channels, one network per
(centre, neighbour) species pair) gives

    T_i = (1 / N_c) sum_j G(s_ij)^T R_ij          (M1 x 4),
    D_i = T_i T_i[:M2]^T                             (M1 x M2, flattened),

which is invariant under rotations, reflections and translations of the structure and
under permutations of the neighbours (the rotation cancels in the 4-vector products).

With ``normalize_rows`` the rows are standardized per centre species first, as DeePMD does
with its davg/dstd: (sw(r) (s - <s>) / std_s, s x / r / std_xyz, ...). Without it the
first column of T_i is a large sum of positive terms, nearly the same for every atom, and the
fitting net sees the small differences of nearly equal numbers (badly conditioned; see
docs/dpwannier.md, "Adam does not continue where L-BFGS stalls"). The extra sw(r) keeps the
shifted column zero at the cutoff, so energies stay smooth.
"""

from __future__ import annotations

import torch
from torch import nn


def smooth_switch(r: torch.Tensor, rcs: float, rc: float) -> torch.Tensor:
    """C2 switch: 1 below ``rcs`` (Å), 0 above ``rc`` (Å), quintic in between. Shape of ``r``."""
    u = ((r - rcs) / (rc - rcs)).clamp(0.0, 1.0)
    return 1.0 + u**3 * (-6.0 * u**2 + 15.0 * u - 10.0)


def env_matrix(vectors: torch.Tensor, rcs: float, rc: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth environment rows (E, 4) and s(r) (E,) for edge vectors (E, 3) in Å."""
    r = vectors.norm(dim=-1)
    s = smooth_switch(r, rcs, rc) / r
    rows = torch.cat([s[:, None], s[:, None] * vectors / r[:, None]], dim=1)
    return rows, s


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh, last_act: bool = False) -> nn.Sequential:
    """Fully connected network with ``act`` between layers (and after the last if asked)."""
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2 or last_act:
            layers.append(act())
    return nn.Sequential(*layers)


class DPDescriptor(nn.Module):
    """se_e2_a descriptor of every atom from a directed edge list.

    Args:
        nspecies: number of species (indices 0..nspecies-1).
        rc, rcs: cutoff and start of the smooth switch, Å.
        embed: hidden/out widths of the embedding net; the last one is M1.
        axis: M2, number of embedding channels kept for the second factor.
        norm: N_c, the constant dividing neighbour sums (about the neighbour count).
    """

    def __init__(self, nspecies: int, rc: float = 7.0, rcs: float = 2.0,
                 embed: tuple[int, ...] = (16, 32), axis: int = 8, norm: float = 100.0,
                 normalize_rows: bool = False):
        super().__init__()
        self.nspecies, self.rc, self.rcs = nspecies, rc, rcs
        self.m1, self.m2, self.norm = embed[-1], axis, norm
        self.normalize_rows = normalize_rows
        self.embed = nn.ModuleList(mlp([1, *embed], last_act=True)
                                   for _ in range(nspecies * nspecies))
        # s(r) is ~0.4 Å^-1 at the nearest neighbour; rescale into the tanh's working range.
        self.register_buffer("s_scale", torch.tensor(2.0))
        if normalize_rows:  # (not in the state of descriptors without it: old checkpoints)
            # Per centre species: mean of s, spreads of the s and of the direction columns,
            # set from data by ``set_row_stats``.
            self.register_buffer("row_avg", torch.zeros(nspecies))
            self.register_buffer("row_std", torch.ones(nspecies, 2))

    @property
    def dim(self) -> int:
        return self.m1 * self.m2

    def env_tensor(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                   vectors: torch.Tensor) -> torch.Tensor:
        """T_i = sum_j G(s_ij)^T R_ij / N_c, shape (N, M1, 4)."""
        rows, s = env_matrix(vectors, self.rcs, self.rc)
        if self.normalize_rows:
            rows = self._normalized(rows, s, species[edge_i], vectors)
        x = (s * self.s_scale)[:, None]
        g = vectors.new_zeros((len(s), self.m1))
        pair = species[edge_i] * self.nspecies + species[edge_j]
        for p in torch.unique(pair).tolist():
            m = pair == p
            g = g.index_put((m.nonzero()[:, 0],), self.embed[p](x[m]))
        # Multiply by s (through rows) so a neighbour at the cutoff contributes exactly zero.
        contrib = g[:, :, None] * rows[:, None, :]
        t = vectors.new_zeros((len(species), self.m1, 4))
        return t.index_add(0, edge_i, contrib) / self.norm

    def _normalized(self, rows: torch.Tensor, s: torch.Tensor, centre: torch.Tensor,
                    vectors: torch.Tensor) -> torch.Tensor:
        """Rows (E, 4) standardized per centre species, still zero at the cutoff."""
        sw = smooth_switch(vectors.norm(dim=-1), self.rcs, self.rc)
        std = self.row_std[centre]
        first = sw * (s - self.row_avg[centre]) / std[:, 0]
        return torch.cat([first[:, None], rows[:, 1:] / std[:, 1:]], dim=1)

    @torch.no_grad()
    def set_row_stats(self, species: torch.Tensor, edge_i: torch.Tensor,
                      vectors: torch.Tensor) -> None:
        """Mean of s and spreads of both kinds of column per centre species, from data."""
        rows, s = env_matrix(vectors, self.rcs, self.rc)
        centre = species[edge_i]
        for a in range(self.nspecies):
            m = centre == a
            if m.sum() < 2:
                continue
            avg = s[m].mean()
            self.row_avg[a] = avg
            self.row_std[a, 0] = (s[m] - avg).std().clamp_min(1e-3)
            self.row_std[a, 1] = rows[m, 1:].pow(2).mean().sqrt().clamp_min(1e-3)

    def forward(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                vectors: torch.Tensor) -> torch.Tensor:
        """Invariant descriptor D, shape (N, M1*M2)."""
        t = self.env_tensor(species, edge_i, edge_j, vectors)
        d = t @ t[:, : self.m2, :].transpose(1, 2)
        return d.reshape(len(species), -1)
