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
                 embed: tuple[int, ...] = (16, 32), axis: int = 8, norm: float = 100.0):
        super().__init__()
        self.nspecies, self.rc, self.rcs = nspecies, rc, rcs
        self.m1, self.m2, self.norm = embed[-1], axis, norm
        self.embed = nn.ModuleList(mlp([1, *embed], last_act=True)
                                   for _ in range(nspecies * nspecies))
        # s(r) is ~0.4 Å^-1 at the nearest neighbour; rescale into the tanh's working range.
        self.register_buffer("s_scale", torch.tensor(2.0))

    @property
    def dim(self) -> int:
        return self.m1 * self.m2

    def env_tensor(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                   vectors: torch.Tensor) -> torch.Tensor:
        """T_i = sum_j G(s_ij)^T R_ij / N_c, shape (N, M1, 4)."""
        rows, s = env_matrix(vectors, self.rcs, self.rc)
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

    def forward(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                vectors: torch.Tensor) -> torch.Tensor:
        """Invariant descriptor D, shape (N, M1*M2)."""
        t = self.env_tensor(species, edge_i, edge_j, vectors)
        d = t @ t[:, : self.m2, :].transpose(1, 2)
        return d.reshape(len(species), -1)
