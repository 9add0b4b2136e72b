"""DPWannierModel: Deep-Potential force field + RAER + E(3)-equivariant Wannier-H heads.

Design (Qi, Gong & Yan, arXiv:2403.13675, improved where noted):

* Force field: se_e2_a descriptor D_i -> per-species fitting net (two hidden layers,
  64 and 32, tanh) -> atomic energy; E = sum_i E_i; forces = -dE/dR and stress =
  (1/V) dE/d(strain) by autograd, so the model is energy-conserving (the paper
  predicts forces directly).
* RAER: the last hidden layer (32) of the fitting net, exposed as ``out["raer"]``.
* Hamiltonian heads (one per category as in the paper): on-site blocks from D_i,
  intra-layer hoppings from (RAER_i, RAER_j, |r_ij|), inter-layer hoppings from |r_ij|
  only; separate networks per ordered species pair and for short (< ``h_split``) and long
  range. Unlike the paper (raw Cartesian inputs) every block is built equivariantly:

      H_ij^{l1 l2} = sum_L sum_c  a_{L,c}(invariants) * C^{l1 l2 L} . V^L_c,

  with C the e3nn Clebsch-Gordan (Wigner 3j) tensors, V^L_c equivariant features of degree
  L and parity (-1)^L (spherical harmonics of the bond direction, and neighbour-density
  tensors sum_k w_c(r_ik) Y_L(r_ik) of each end's environment), so rotating a structure
  rotates each block by D^{l1} H D^{l2 T} exactly. Inter-layer blocks use Y_L(r_ij) only
  (two-centre, Slater-Koster-like). Hermiticity is exact: H_ij(R) = (f(i->j) +
  f(j->i)^T) / 2.
* Vacuum-level alignment: a polynomial C(strain, N_out/N_in - 1) per layer, fitted by
  least squares, added to that layer's on-site diagonal.
* Optional energy correction (``ff_correction``): a second Deep-Potential term with a
  row-normalized environment added to every atomic energy. It improves the forces of a
  trained model without changing the RAER the heads read (see ``EnergyCorrection``).

Orbital order follows ``ase_mlks.core.orbitals`` (blocks are converted from e3nn's order).
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import torch
from ase.data import atomic_numbers
from e3nn import o3
from torch import nn

from ase_mlks.core.checkpoint import CheckpointMixin
from ase_mlks.core.orbitals import OrbitalBasis, e3nn_to_ours

from .descriptor import DPDescriptor, mlp, smooth_switch
from .graph import DPGraph

ONSITE, INTRA, INTER = "onsite", "intra", "inter"



STD_FLOOR = 0.1  # descriptor normalization floor, fraction of the largest spread

def _coupling(l1: int, l2: int, big_l: int) -> torch.Tensor:
    """Wigner-3j (2l1+1, 2l2+1, 2L+1) scaled by sqrt(2L+1): couples l1 (x) l2 -> L with
    unit-norm-preserving weights."""
    return o3.wigner_3j(l1, l2, big_l) * math.sqrt(2 * big_l + 1)


class GaussianBasis(nn.Module):
    """Gaussian radial basis on [0, r_max] Å times a smooth cutoff; output (E, n)."""

    def __init__(self, n: int, r_max: float, r_min: float = 0.0):
        super().__init__()
        self.register_buffer("centers", torch.linspace(r_min, r_max, n))
        self.width = (r_max - r_min) / (n - 1)
        self.r_max = r_max

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        g = torch.exp(-(((r[:, None] - self.centers) / self.width) ** 2))
        return g * smooth_switch(r, self.r_max - 1.0, self.r_max)[:, None]


class VacuumAlignment(nn.Module):
    """Per-layer on-site shift C(strain, rho) = sum_{a+b<=deg} c_ab strain^a (rho-1)^b (eV).

    ``rho`` = N_out / N_in. Fitted by linear least squares (``fit``); zero until fitted.
    Monomials whose value does not vary in the data keep a zero coefficient, so data with
    one layer ratio only give a constant and say nothing about other ratios.
    """

    def __init__(self, degree: int = 2):
        super().__init__()
        self.degree = degree
        self.powers = [(a, b) for a in range(degree + 1) for b in range(degree + 1 - a)]
        self.register_buffer("coef", torch.zeros(len(self.powers), dtype=torch.float64))

    def features(self, feat: torch.Tensor) -> torch.Tensor:
        eps, rho = feat[:, 0], feat[:, 1] - 1.0
        return torch.stack([eps**a * rho**b for a, b in self.powers], dim=1)

    def forward(self, layer_feat: torch.Tensor) -> torch.Tensor:
        """Shift per layer (nlayers,) in eV."""
        return self.features(layer_feat.to(self.coef.dtype)) @ self.coef

    def fit(self, layer_feat: np.ndarray, shift: np.ndarray, rcond: float = 1e-8) -> float:
        """Least-squares fit to measured per-layer shifts (eV); returns the R^2 of the fit."""
        x = self.features(torch.as_tensor(np.asarray(layer_feat), dtype=torch.float64)).numpy()
        y = np.asarray(shift, dtype=np.float64)
        # Monomials that do not vary in the data cannot be told from the constant: leave them
        # at zero instead of letting a min-norm solution extrapolate with them.
        use = np.array([a + b == 0 or x[:, n].std() > 1e-6
                        for n, (a, b) in enumerate(self.powers)])
        coef = np.zeros(len(self.powers))
        coef[use], *_ = np.linalg.lstsq(x[:, use], y, rcond=rcond)
        self.coef.copy_(torch.as_tensor(coef, dtype=self.coef.dtype))
        resid = y - x @ coef
        ss = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float((resid**2).sum()) / ss if ss > 0 else 1.0


class EnergyCorrection(nn.Module):
    """Residual Deep-Potential atomic energies (N,) eV from a row-normalized se_e2_a descriptor.

    The base force field's last hidden layer is the RAER the Hamiltonian heads read, so
    training that network further on forces would move the heads' inputs. This term adds
    energy (hence forces and stress) without touching the RAER. Its environment rows are
    standardized (``DPDescriptor(normalize_rows=True)``), the conditioning the base network
    lacks. The output layers start at zero: a model grown with it predicts exactly what the
    model without it did, and training starts from there.
    """

    def __init__(self, nspecies: int, rc: float, rcs: float, embed: tuple[int, ...],
                 axis: int, fit: tuple[int, ...], norm: float, species_stats: bool = False):
        super().__init__()
        self.descriptor = DPDescriptor(nspecies, rc=rc, rcs=rcs, embed=tuple(embed), axis=axis,
                                       norm=norm, normalize_rows=True)
        self.fit = nn.ModuleList(mlp([self.descriptor.dim, *fit, 1]) for _ in range(nspecies))
        for net in self.fit:
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        # species_stats: one mean/spread per centre species (rows of d_mean, d_std), as
        # DeePMD's per-type davg/dstd. Pooled over species, the spread is set by the
        # difference between Mo and S descriptors, and each net sees nearly constant inputs
        # (Mo atoms of one bilayer vary by 0.03 of it; per species 0.13). It does not
        # stop Adam at lr 1e-3 from saturating the nets (docs/dpwannier.md, session 15).
        # Off: one pooled row (the shipped model and older checkpoints).
        self.species_stats = species_stats
        shape = (nspecies, self.descriptor.dim) if species_stats else (self.descriptor.dim,)
        self.register_buffer("d_mean", torch.zeros(shape))
        self.register_buffer("d_std", torch.ones(shape))

    def standardized(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                     vectors: torch.Tensor) -> torch.Tensor:
        """The fitting nets' inputs (N, M1*M2): the descriptor minus its mean, over its spread."""
        mean, std = ((self.d_mean[species], self.d_std[species]) if self.species_stats
                     else (self.d_mean, self.d_std))
        return (self.descriptor(species, edge_i, edge_j, vectors) - mean) / std

    def forward(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                vectors: torch.Tensor) -> torch.Tensor:
        x = self.standardized(species, edge_i, edge_j, vectors)
        e = x.new_zeros(len(species))
        for a, net in enumerate(self.fit):
            m = (species == a).nonzero()[:, 0]
            if len(m):
                e = e.index_put((m,), net(x[m])[:, 0])
        return e

    @torch.no_grad()
    def set_stats(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                  vectors: torch.Tensor) -> None:
        """Row statistics, then the descriptor's mean and (floored) spread, from data.

        With ``species_stats`` each species gets its own row; a species absent from the
        data (or with one atom) keeps mean 0 and spread 1.
        """
        self.descriptor.set_row_stats(species, edge_i, vectors)
        d = self.descriptor(species, edge_i, edge_j, vectors)
        if not self.species_stats:
            self.d_mean.copy_(d.mean(0))
            self.d_std.copy_(floored_spread(d))
            return
        for a in range(len(self.d_mean)):
            rows = d[species == a]
            if len(rows) > 1:
                self.d_mean[a] = rows.mean(0)
                self.d_std[a] = floored_spread(rows)


def floored_spread(d: torch.Tensor) -> torch.Tensor:
    """Per-column standard deviation of ``d`` (N, F), floored at STD_FLOOR times the largest.

    D is quadratic in the environment tensor, so its components' spreads span orders of
    magnitude; dividing a nearly constant one by its own tiny spread would amplify the
    embedding net's updates ~1e4-fold (training went chaotic: energies jumped by
    100 meV/atom between epochs). The floor keeps such components small instead.
    """
    std = d.std(0)
    return std.clamp_min(STD_FLOOR * float(std.max()))


class DPWannierModel(nn.Module, CheckpointMixin):
    """Force field + Wannier Hamiltonian of layered materials from one descriptor.

    Args:
        species: element symbols, e.g. ("Mo", "S").
        orbitals: Wannier basis per element, e.g. {"Mo": "4d", "S": "3p"}.
        rc, rcs: force-field cutoff and switch start (Å).
        embed, axis: embedding widths (last = M1) and M2 of the se_e2_a descriptor.
        fit: fitting-net hidden widths; the last is the RAER size.
        h_cutoff: hopping cutoff (Å); h_split: short/long-range boundary (Å).
        env_channels: channels of each environment tensor degree L.
        n_radial: Gaussian basis size for hopping distances.
        intra_hidden, inter_hidden, onsite_hidden: widths of the H coefficient nets.
        areal_density: unstrained atoms per Å^2 of one layer (strain of the alignment).
        min_distance: closest approach accepted (Å), set by the trainer from its data.
        alignment_degree: polynomial degree of the vacuum alignment.
        manifold_electrons: electrons per atom in the Wannier manifold, per element.
        core_bands: DFT bands per atom below the manifold (maps model to DFT band indices).
        fit_conduction_bands: conduction bands per atom included in band-energy fits.
        ff_correction: add an ``EnergyCorrection`` (widths ``correction_embed``,
            ``correction_axis``, ``correction_fit``) to the atomic energies;
            ``correction_species_stats`` standardizes its descriptor per species.
    """

    pretrained_prefix = "dpwannier-"

    def __init__(self, species: tuple[str, ...] = ("Mo", "S"),
                 orbitals: dict[str, str] | None = None, rc: float = 7.0, rcs: float = 2.0,
                 embed: tuple[int, ...] = (16, 32), axis: int = 8,
                 fit: tuple[int, ...] = (64, 32), h_cutoff: float = 10.0, h_split: float = 6.0,
                 env_channels: int = 4, n_radial: int = 16,
                 intra_hidden: tuple[int, ...] = (64, 32), inter_hidden: tuple[int, ...] = (32, 16),
                 onsite_hidden: tuple[int, ...] = (64, 32), areal_density: float = 0.3424,
                 min_distance: float = 1.8, alignment_degree: int = 2,
                 env_norm: float = 100.0, manifold_electrons: dict[str, float] | None = None,
                 core_bands: dict[str, int] | None = None,
                 fit_conduction_bands: dict[str, int] | None = None,
                 bond_invariants: bool = False, bond_products: bool = False,
                 interlayer_environment: bool = False, ff_correction: bool = False,
                 correction_embed: tuple[int, ...] = (16, 32), correction_axis: int = 8,
                 correction_fit: tuple[int, ...] = (64, 64),
                 correction_species_stats: bool = False, bond_chirality: bool = False,
                 chirality_channels: int = 4):
        super().__init__()
        orbitals = dict(orbitals or {"Mo": "4d", "S": "3p"})
        self.hparams = dict(
            species=list(species), orbitals=orbitals, rc=rc, rcs=rcs, embed=list(embed),
            axis=axis, fit=list(fit), h_cutoff=h_cutoff, h_split=h_split,
            env_channels=env_channels, n_radial=n_radial, intra_hidden=list(intra_hidden),
            inter_hidden=list(inter_hidden), onsite_hidden=list(onsite_hidden),
            areal_density=areal_density, min_distance=min_distance,
            alignment_degree=alignment_degree, env_norm=env_norm,
            bond_invariants=bond_invariants, bond_products=bond_products,
            interlayer_environment=interlayer_environment, ff_correction=ff_correction,
            correction_embed=list(correction_embed), correction_axis=correction_axis,
            correction_fit=list(correction_fit), correction_species_stats=correction_species_stats,
            bond_chirality=bond_chirality, chirality_channels=chirality_channels,
            manifold_electrons=dict(manifold_electrons or {"Mo": 2.0, "S": 6.0}),
            core_bands=dict(core_bands or {"Mo": 4, "S": 1}),
            fit_conduction_bands=dict(fit_conduction_bands or {"Mo": 1, "S": 0}))
        # DFT bands below the Wannier manifold per atom (GPAW setups: Mo 4s4p, S 3s), and
        # conduction bands per atom whose energies stage 2 fits (Mo: the lowest d band).
        self.core_bands = self.hparams["core_bands"]
        self.fit_conduction_bands = self.hparams["fit_conduction_bands"]
        # Electrons each atom brings into the Wannier manifold (Mo4+ d^2, S2- p^6 for MoS2).
        self.manifold_electrons = self.hparams["manifold_electrons"]
        self.species = list(species)
        self.numbers = [atomic_numbers[s] for s in species]
        self.basis = OrbitalBasis(orbitals)
        self.rc, self.h_cutoff, self.h_split = rc, h_cutoff, h_split
        self.areal_density, self.min_distance = areal_density, min_distance
        ns = len(species)

        # ---- force field ---------------------------------------------------------
        self.descriptor = DPDescriptor(ns, rc=rc, rcs=rcs, embed=tuple(embed), axis=axis,
                                       norm=env_norm)
        self.fit_hidden = nn.ModuleList(mlp([self.descriptor.dim, *fit], last_act=True)
                                        for _ in range(ns))
        self.fit_out = nn.ModuleList(nn.Linear(fit[-1], 1) for _ in range(ns))
        self.register_buffer("d_mean", torch.zeros(self.descriptor.dim))
        self.register_buffer("d_std", torch.ones(self.descriptor.dim))
        self.register_buffer("e_bias", torch.zeros(ns))
        self.register_buffer("e_scale", torch.ones(()))
        self.correction = (EnergyCorrection(ns, rc, rcs, correction_embed, correction_axis,
                                            correction_fit, env_norm, correction_species_stats)
                           if ff_correction else None)

        # ---- Hamiltonian heads -----------------------------------------------------
        self.shells = [[(s.l, off) for s, off in zip(
            self.basis.shells_of(sp), np.cumsum([0] + [x.size for x in self.basis.shells_of(sp)]))]
            for sp in species]
        self.norb = [self.basis.norb(sp) for sp in species]
        self.nmax = max(self.norb)
        lmax = self.basis.lmax()
        self.lmax_feat = 2 * lmax
        self.c_env = env_channels
        self.rbf = GaussianBasis(n_radial, h_cutoff)
        self.env_rbf = GaussianBasis(n_radial, rc)
        self.env_weights = nn.Linear(n_radial * ns, env_channels * (self.lmax_feat + 1),
                                     bias=False)
        self.env_norm = env_norm
        self.bond_products = bond_products
        self.bond_chirality = bond_chirality
        # Inter-layer hoppings as the paper has them: a function of the relative position only
        # (two-centre). With ``interlayer_environment`` they see both atoms' environments like
        # the intra-layer ones (RAERs, environment tensors, bond products): the Löwdin tails
        # of Wannier functions make inter-layer blocks depend on the neighbourhoods too.
        self.interlayer_environment = interlayer_environment
        for l1, l2 in {(a, b) for sh in self.shells for a, _ in sh
                       for sh2 in self.shells for b, _ in sh2}:
            for big_l, _ in self._degrees(INTRA, l1, l2):
                self.register_buffer(f"cg_{l1}_{l2}_{big_l}", _coupling(l1, l2, big_l))
        for l in range(lmax + 1):
            self.register_buffer(f"p_{l}", torch.as_tensor(e3nn_to_ours(l), dtype=torch.float32))
        raer = fit[-1]
        self.bond_invariants = bond_invariants
        # Bond-projected environment invariants Y_L(r_ij) . T^L (L >= 1, both ends): tell the
        # intra-layer coefficients how each end's neighbours sit relative to the bond.
        n_bond = 2 * env_channels * self.lmax_feat if bond_invariants else 0
        # Bond-direction x environment products (Y_L1(r_ij) (x) T^L2 -> L, both ends). Without
        # them an intra-layer block is c_0 Y_L(r_ij) + sum_c c_c T^L, proper tensors only: a
        # two-centre form plus site tensors. Wannier hoppings in a crystal also have
        # pseudo-tensor parts (e.g. L = 2 of a d-p block, odd L of d-d), which need an odd
        # coupling such as r_ij x T^1 (measured on the ideal monolayer: best possible fit of the
        # proper-only form misses the Mo-S / Mo-Mo nearest-neighbour blocks by 43-55 meV).
        self.product_paths = self._product_paths() if bond_products else {}
        self.product_columns: dict[tuple[int, int, int, bool], int] = {}
        if bond_products:
            self._register_product_tables()
        # Handedness of a bond's environment (``bond_chirality``). The heads' coefficients are
        # O(3) invariants, so they cannot tell an environment from its mirror image; but a
        # bond that lies in no mirror plane of its environment (in ideal MoS2: the S-S bonds
        # at 4.46 Å and the Mo-S at 5.11 Å) has Wannier blocks whose pseudo-tensor part flips
        # sign with the handedness. Measured on the ideal monolayer: a least-squares fit of
        # those blocks by the features without it (coefficients of bounded size) misses by
        # 5.0 and 4.3 meV; with pseudo-scalars x the proper features it fits them exactly.
        # Pseudo-scalars: [(Y_L1(r_ij) (x) T^L2_x)_L . T^L_y], L1 + L2 + L odd, ends x, y: the
        # axial bond products (already computed) dotted with an end's environment tensor.
        self.n_chi = chirality_channels if bond_chirality else 0
        if bond_chirality and not bond_products:
            raise ValueError("bond_chirality builds on the bond products: set bond_products")
        if bond_chirality:
            n_raw = self._n_raw_chirality()
            # A fixed random mixing (its own generator: checkpoints stay reproducible) into a
            # few pseudo-scalars; no bias, so the mixtures stay odd under a reflection.
            gen = torch.Generator().manual_seed(20261203)
            self.register_buffer("chi_mix", torch.randn(self.n_chi, n_raw, generator=gen)
                                 / n_raw ** 0.5)
            # RMS of each raw pseudo-scalar over training bonds (set from data).
            self.register_buffer("chi_scale", torch.ones(n_raw))
        self.heads = nn.ModuleDict()
        for a in range(ns):
            self.heads[f"{ONSITE}_{a}"] = mlp([self.descriptor.dim, *onsite_hidden,
                                               self._ncoef(ONSITE, a, a)])
        self.head_inputs = {ONSITE: [("descriptor", self.descriptor.dim)]}
        for cat in (INTRA, INTER):
            self.head_inputs[cat] = ([("raer_i", raer), ("raer_j", raer), ("rbf", n_radial),
                                      ("bond", n_bond)] if self._environmental(cat)
                                     else [("rbf", n_radial)])
        for a, b, rng in product(range(ns), range(ns), ("short", "long")):
            for cat, hidden in ((INTRA, intra_hidden), (INTER, inter_hidden)):
                width = sum(n for _, n in self.head_inputs[cat])
                self.heads[f"{cat}_{a}_{b}_{rng}"] = mlp([width, *hidden,
                                                          self._ncoef(cat, a, b)])
        # Start every head at zero output (H = mean on-site energies): a head that sees no
        # data (e.g. inter-layer heads trained on monolayers only) then adds nothing.
        for head in self.heads.values():
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
        # Mean on-site energy of each orbital (eV, ours order), set from data by the trainer;
        # the heads learn deviations. Stored per species as a padded (nmax,) vector.
        self.register_buffer("onsite_bias", torch.zeros(ns, self.nmax))
        self.register_buffer("h_scale", torch.ones(()))
        self.alignment = VacuumAlignment(alignment_degree)

    # ------------------------------------------------------------------------------
    def _environmental(self, cat: str) -> bool:
        """Whether hoppings of this category see the atoms' environments."""
        return cat == INTRA or (cat == INTER and self.interlayer_environment)

    def _degrees(self, cat: str, l1: int, l2: int) -> list[tuple[int, bool]]:
        """Components (L, pseudo) of an l1 x l2 block the category's features can build.

        ``pseudo``: parity (-1)^(L+1), i.e. L + l1 + l2 odd. Only hoppings that see the
        environment, with bond products, have pseudo-tensor features; the rest are proper.
        """
        pseudo_ok = self._environmental(cat) and (self.bond_products or self.bond_chirality)
        return [(L, (L + l1 + l2) % 2 == 1) for L in range(abs(l1 - l2), l1 + l2 + 1)
                if (L + l1 + l2) % 2 == 0 or pseudo_ok]

    def _product_paths(self) -> dict[tuple[int, bool], list[tuple[int, int]]]:
        """(L1, L2) -> (L, pseudo) couplings of bond harmonics with environment tensors,
        L1, L2, L >= 1; pseudo when L1 + L2 + L is odd (an axial coupling, e.g. a cross
        product)."""
        top = self.lmax_feat
        return {(big_l, pseudo): [(l1, l2) for l1 in range(1, top + 1)
                                  for l2 in range(1, top + 1)
                                  if abs(l1 - l2) <= big_l <= l1 + l2
                                  and (l1 + l2 + big_l) % 2 == pseudo]
                for big_l in range(1, top + 1) for pseudo in (False, True)}

    def _register_product_tables(self) -> None:
        """One coupling matrix per bond degree L1: ``tp_{L1}`` maps the outer product
        Y_L1 (x) [T^1 .. T^top] (flattened) to the columns of every (L1, L2) -> L path, so
        the products cost one matmul per L1 instead of one contraction per path."""
        top = self.lmax_feat
        start = {l2: sum(2 * x + 1 for x in range(1, l2)) for l2 in range(1, top + 1)}
        width = sum(2 * x + 1 for x in range(1, top + 1))
        for l1 in range(1, top + 1):
            blocks, col = [], 0
            for (big_l, pseudo), paths in self.product_paths.items():
                for p1, l2 in paths:
                    if p1 != l1:
                        continue
                    m = torch.zeros(2 * l1 + 1, width, 2 * big_l + 1)
                    m[:, start[l2]:start[l2] + 2 * l2 + 1] = _coupling(l1, l2, big_l)
                    blocks.append(m)
                    self.product_columns[(l1, l2, big_l, pseudo)] = col
                    col += 2 * big_l + 1
            self.register_buffer(f"tp_{l1}", torch.cat(blocks, dim=2).reshape(-1, col))

    def _nchan(self, cat: str, big_l: int, pseudo: bool = False) -> int:
        """Feature channels of component (L, pseudo): the coefficients per (shell pair, L)."""
        if cat == ONSITE:
            return 0 if pseudo else 1 + self.c_env
        if not self._environmental(cat):
            return 0 if pseudo else 1
        base = 0 if pseudo else 1 + 2 * self.c_env
        chiral = self.n_chi * (1 + 2 * self.c_env) if pseudo and big_l >= 1 else 0
        return (base + 2 * self.c_env * len(self.product_paths.get((big_l, pseudo), ()))
                + chiral)

    def coefficient_layout(self, cat: str, a: int, b: int
                           ) -> dict[tuple[int, int, int, bool], tuple[int, int]]:
        """(l1, l2, L, pseudo) -> (first row, channels) of a head's output coefficients."""
        out, k = {}, 0
        for l1, _ in self.shells[a]:
            for l2, _ in self.shells[b]:
                for big_l, pseudo in self._degrees(cat, l1, l2):
                    n = self._nchan(cat, big_l, pseudo)
                    out[(l1, l2, big_l, pseudo)] = (k, n)
                    k += n
        return out

    def grow_from(self, old: DPWannierModel) -> None:
        """Start from ``old`` (same force field; heads as wide or wider, fewer or as many
        feature channels, e.g. without bond products): every weight is copied, and what is
        new cannot yet reach the output — new input columns, the weights out of new hidden
        units and new coefficient rows start at zero — so the model computes exactly what
        ``old`` did. New hidden units keep their random input weights, so that training
        moves them once their (zero) output weights do."""
        mine = self.state_dict()
        for key, value in old.state_dict().items():
            if key in mine and mine[key].shape == value.shape:
                mine[key] = value.to(mine[key].dtype)
        for name, head in self.heads.items():
            cat, a, *rest = name.split("_")  # onsite_{a} or {intra,inter}_{a}_{b}_{range}
            a, b = int(a), int(rest[0]) if rest else int(a)
            linears = [k for k, layer in enumerate(head) if isinstance(layer, nn.Linear)]
            old_head = old.heads[name]
            if len(linears) != sum(isinstance(x, nn.Linear) for x in old_head):
                raise ValueError(f"head {name}: depth changed, cannot grow")
            for depth, k in enumerate(linears):
                weight = head[k].weight.detach().clone()
                bias = head[k].bias.detach().clone()
                w_old, b_old = old_head[k].weight, old_head[k].bias
                h_out, h_in = w_old.shape
                if k == linears[-1]:  # coefficient rows move to their new places
                    weight.zero_()
                    bias.zero_()
                    rows = self._coefficient_rows(cat, a, b, old)
                elif h_out > weight.shape[0]:
                    raise ValueError(f"head {name} is narrower than the saved one "
                                     f"({h_out} -> {weight.shape[0]} units): cannot grow")
                else:
                    rows = [(0, 0, h_out)]
                if depth == 0:  # input features may be new or moved
                    cols = self._input_columns(cat, old)
                    weight[:h_out] = 0.0  # old units: new input columns start at zero
                else:
                    cols = [(c, c) for c in range(h_in)]
                    weight[:, h_in:] = 0.0  # new units of the layer below feed nothing yet
                new_cols = torch.tensor([c for c, _ in cols], dtype=torch.long)
                old_cols = torch.tensor([c for _, c in cols], dtype=torch.long)
                for r_new, r_old, n in rows:
                    weight[r_new:r_new + n, new_cols] = w_old[r_old:r_old + n][:, old_cols].to(
                        weight.dtype)
                    bias[r_new:r_new + n] = b_old[r_old:r_old + n].to(bias.dtype)
                prefix = f"heads.{name}.{k}."
                mine[prefix + "weight"], mine[prefix + "bias"] = weight, bias
        self.load_state_dict(mine)

    def _coefficient_rows(self, cat: str, a: int, b: int, old: DPWannierModel
                          ) -> list[tuple[int, int, int]]:
        """(new first row, old first row, count) of each coefficient block both models have;
        the old channels lead each component's channel list."""
        mine = self.coefficient_layout(cat, a, b)
        return [(mine[key][0], k_old, n_old)
                for key, (k_old, n_old) in old.coefficient_layout(cat, a, b).items()]

    def _input_columns(self, cat: str, old: DPWannierModel) -> list[tuple[int, int]]:
        """(new, old) column pairs of the inputs both models' heads of ``cat`` take."""
        def offsets(model: DPWannierModel) -> dict[str, tuple[int, int]]:
            out, k = {}, 0
            for name, n in model.head_inputs[cat]:
                out[name] = (k, n)
                k += n
            return out

        new_off, old_off = offsets(self), offsets(old)
        pairs = []
        for name, (k_old, n) in old_off.items():
            if n and name in new_off:
                if new_off[name][1] != n:
                    raise ValueError(f"head input {name!r} changed size ({n} -> "
                                     f"{new_off[name][1]}): cannot grow")
                pairs += [(new_off[name][0] + c, k_old + c) for c in range(n)]
        return pairs

    def _ncoef(self, cat: str, a: int, b: int) -> int:
        return sum(self._nchan(cat, big_l, pseudo) for l1, _ in self.shells[a]
                   for l2, _ in self.shells[b] for big_l, pseudo in self._degrees(cat, l1, l2))

    # ---- force field ---------------------------------------------------------------
    def atomic_energies(self, g: DPGraph, vectors: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-atom energies (N,) eV, RAER (N, fit[-1]) and descriptor (N, M1*M2)."""
        d = self.descriptor(g.species, g.ff_i, g.ff_j, vectors)
        x = (d - self.d_mean) / self.d_std
        raer = x.new_zeros((len(d), self.fit_out[0].in_features))
        e = x.new_zeros(len(d))
        for a in range(len(self.species)):
            m = (g.species == a).nonzero()[:, 0]
            if len(m) == 0:
                continue
            h = self.fit_hidden[a](x[m])
            raer = raer.index_put((m,), h)
            e = e.index_put((m,), self.fit_out[a](h)[:, 0] * self.e_scale + self.e_bias[a])
        if self.correction is not None:
            e = e + self.correction(g.species, g.ff_i, g.ff_j, vectors)
        return e, raer, d

    def forward(self, g: DPGraph, forces: bool = True, stress: bool = False,
                hamiltonian: bool = False, create_graph: bool = False) -> dict:
        """Energies (B,), forces (N,3), stress (B,3,3), RAER, descriptor, H blocks.

        H output (if ``hamiltonian``): ``onsite`` (N, nmax, nmax) and ``hop``
        (H, nmax, nmax) blocks in eV, padded beyond each atom's orbital count.
        """
        pos = g.positions
        cell = g.cell
        if forces:
            pos = pos.detach().requires_grad_(True)
        strain = None
        if stress:
            strain = torch.zeros_like(cell, requires_grad=True)
            sym = 0.5 * (strain + strain.transpose(1, 2))
            pos_s = pos + torch.einsum("ni,nij->nj", pos, sym[g.batch])
            cell_s = cell + cell @ sym
        else:
            pos_s, cell_s = pos, cell
        vec = self._vectors(pos_s, cell_s, g.batch, g.ff_i, g.ff_j, g.ff_shift)
        e_atom, raer, d = self.atomic_energies(g, vec)
        energy = torch.zeros(g.nstruct, dtype=e_atom.dtype).index_add(0, g.batch, e_atom)
        out = {"energy": energy, "energies": e_atom, "raer": raer, "descriptor": d}
        if forces or stress:
            inputs = [pos] if forces else []
            if stress:
                inputs.append(strain)
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
            if forces:
                out["forces"] = -grads[0]
            if stress:
                out["stress"] = grads[-1] / g.volume[:, None, None]
        if hamiltonian:
            out.update(self.hamiltonian_blocks(g, d, raer))
        return out

    @staticmethod
    def _vectors(pos, cell, batch, i, j, shift) -> torch.Tensor:
        return pos[j] - pos[i] + torch.einsum("ek,ekl->el", shift, cell[batch[i]])

    # ---- Hamiltonian -----------------------------------------------------------------
    def env_tensors(self, g: DPGraph, vec: torch.Tensor) -> list[torch.Tensor]:
        """Equivariant neighbour densities T^L_i = sum_k w_c(r_ik) Y_L(r_ik) / N_c.

        Returns one tensor (N, C, 2L+1) per L = 0..2*lmax (e3nn order).
        """
        r = vec.norm(dim=1)
        ns = len(self.species)
        onehot = nn.functional.one_hot(g.species[g.ff_j], ns).to(vec.dtype)
        rad = (self.env_rbf(r)[:, None, :] * onehot[:, :, None]).reshape(len(r), -1)
        w = self.env_weights(rad).reshape(len(r), self.lmax_feat + 1, self.c_env)
        out = []
        for big_l in range(self.lmax_feat + 1):
            y = o3.spherical_harmonics(big_l, vec, normalize=True)
            contrib = w[:, big_l, :, None] * y[:, None, :]
            t = vec.new_zeros((len(g.species), self.c_env, 2 * big_l + 1))
            out.append(t.index_add(0, g.ff_i, contrib) / self.env_norm)
        return out

    def _blocks(self, cat: str, a: int, b: int, coef: torch.Tensor,
                feats: dict[tuple[int, bool], torch.Tensor]) -> torch.Tensor:
        """Assemble (E, nmax, nmax) blocks (ours order) from coefficients and features.

        ``feats[(L, pseudo)]`` has shape (E, nchan, 2L+1); coefficients are consumed in the
        order (shell pair, component, channel).
        """
        blk = coef.new_zeros((len(coef), self.nmax, self.nmax))
        k = 0
        for l1, o1 in self.shells[a]:
            for l2, o2 in self.shells[b]:
                sub = coef.new_zeros((len(coef), 2 * l1 + 1, 2 * l2 + 1))
                for big_l, pseudo in self._degrees(cat, l1, l2):
                    nchan = self._nchan(cat, big_l, pseudo)
                    c = coef[:, k:k + nchan]
                    k += nchan
                    v = torch.einsum("ec,eck->ek", c, feats[(big_l, pseudo)])
                    cg = getattr(self, f"cg_{l1}_{l2}_{big_l}").to(coef.dtype)
                    sub = sub + torch.einsum("abk,ek->eab", cg, v)
                p1 = getattr(self, f"p_{l1}").to(coef.dtype)
                p2 = getattr(self, f"p_{l2}").to(coef.dtype)
                blk[:, o1:o1 + 2 * l1 + 1, o2:o2 + 2 * l2 + 1] = p1 @ sub @ p2.T
        return blk

    def hamiltonian_blocks(self, g: DPGraph, d: torch.Tensor, raer: torch.Tensor) -> dict:
        """On-site (N, nmax, nmax) and hopping (H, nmax, nmax) blocks, eV."""
        vec_ff = self._vectors(g.positions, g.cell, g.batch, g.ff_i, g.ff_j, g.ff_shift)
        env = self.env_tensors(g, vec_ff)
        x = (d - self.d_mean) / self.d_std
        dtype = x.dtype
        n = len(g.species)
        onsite = x.new_zeros((n, self.nmax, self.nmax))
        for a in range(len(self.species)):
            m = (g.species == a).nonzero()[:, 0]
            if len(m) == 0:
                continue
            coef = self.heads[f"{ONSITE}_{a}"](x[m])
            feats = {}
            for big_l, t in enumerate(env):
                const = t.new_zeros((len(m), 1, 2 * big_l + 1))
                if big_l == 0:
                    const = const + 1.0
                feats[(big_l, False)] = torch.cat([const, t[m]], dim=1)
            blk = self._blocks(ONSITE, a, a, coef, feats) * self.h_scale
            blk = 0.5 * (blk + blk.transpose(1, 2))
            blk = blk + torch.diag_embed(self.onsite_bias[a].to(dtype))[None]
            onsite = onsite.index_put((m,), blk)
        shift = self.alignment(g.layer_feat).to(dtype)[g.layer]
        eye = torch.stack([torch.diag_embed((torch.arange(self.nmax) < self.norb[s]).to(dtype))
                           for s in range(len(self.species))])
        onsite = onsite + shift[:, None, None] * eye[g.species]

        vec = self._vectors(g.positions, g.cell, g.batch, g.h_i, g.h_j, g.h_shift)
        r = vec.norm(dim=1)
        rbf = self.rbf(r)
        ys = [o3.spherical_harmonics(big_l, vec, normalize=True)[:, None, :]
              for big_l in range(self.lmax_feat + 1)]
        same = g.layer[g.h_i] == g.layer[g.h_j]
        short = r < self.h_split
        si, sj = g.species[g.h_i], g.species[g.h_j]
        raw = x.new_zeros((len(r), self.nmax, self.nmax))
        for cat, a, b, rng in product((INTRA, INTER), range(len(self.species)),
                                      range(len(self.species)), ("short", "long")):
            m = ((same if cat == INTRA else ~same) & (si == a) & (sj == b)
                 & (short if rng == "short" else ~short)).nonzero()[:, 0]
            if len(m) == 0:
                continue
            if self._environmental(cat):
                parts = [raer[g.h_i[m]], raer[g.h_j[m]], rbf[m]]
                if self.bond_invariants:
                    parts += self._bond_invariants(ys, env, g.h_i[m], g.h_j[m], m)
                inp = torch.cat(parts, dim=1)
                feats = self._environment_features(ys, env, g.h_i[m], g.h_j[m], m)
            else:
                inp = rbf[m]
                feats = {(big_l, False): y[m] for big_l, y in enumerate(ys)}
            coef = self.heads[f"{cat}_{a}_{b}_{rng}"](inp)
            blk = self._blocks(cat, a, b, coef, feats)
            raw = raw.index_put((m,), blk * self.h_scale)
        # Exact hermiticity: H_ij(R) = (f(i->j, R) + f(j->i, -R)^T) / 2; smooth decay to 0
        # at h_cutoff so bands change continuously as pairs cross the cutoff.
        hop = 0.5 * (raw + raw[g.h_rev].transpose(1, 2))
        hop = hop * smooth_switch(r, self.h_cutoff - 1.0, self.h_cutoff)[:, None, None]
        return {"onsite": onsite, "hop": hop}

    def _environment_features(self, ys: list[torch.Tensor], env: list[torch.Tensor],
                              i: torch.Tensor, j: torch.Tensor, m: torch.Tensor
                              ) -> dict[tuple[int, bool], torch.Tensor]:
        """Features of hoppings that see the environment, edges ``m`` from ``i`` to ``j``:
        bond harmonics and both ends' environment tensors per degree (plus the bond products
        when enabled), ``{(L, pseudo): (E, nchan, 2L+1)}``."""
        feats = {(big_l, False): torch.cat([y[m], t[i], t[j]], dim=1)
                 for big_l, (y, t) in enumerate(zip(ys, env))}
        if self.bond_products:
            base = dict(feats)
            coupled = [self._bond_couplings(ys, env, end, m) for end in (i, j)]
            feats = self._with_bond_products(feats, coupled)
            if self.bond_chirality:
                raw = self._raw_chirality(coupled, env, i, j)
                feats = self._with_chirality(feats, base, self._chirality(raw))
        return feats

    def _n_raw_chirality(self) -> int:
        # a tensor's odd coupling with itself vanishes: same-end pairs need L2 != L
        same_end = sum(l2 != big_l for (big_l, pseudo), paths in self.product_paths.items()
                       if pseudo for _, l2 in paths)
        cross = sum(len(paths) for (_, pseudo), paths in self.product_paths.items() if pseudo)
        return self.c_env * 2 * (same_end + cross)

    def _raw_chirality(self, coupled: list[dict[int, torch.Tensor]], env: list[torch.Tensor],
                       i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(E, n_raw) pseudo-scalars [(Y_L1(r_ij) (x) T^L2_x)_L . T^L_y] per channel, L1 + L2
        + L odd (the axial bond products), for the ends (x, y) = (i, i), (j, j), (i, j),
        (j, i). ``coupled``: the bond couplings of ends i and j (``_bond_couplings``)."""
        out = []
        for x, y in ((0, 0), (1, 1), (0, 1), (1, 0)):
            t_y = [t[(i, j)[y]] for t in env]
            for (big_l, pseudo), paths in self.product_paths.items():
                if not pseudo:
                    continue
                for l1, l2 in paths:
                    if x == y and l2 == big_l:  # (T (x) T)_odd of a tensor with itself: 0
                        continue
                    c0 = self.product_columns[(l1, l2, big_l, pseudo)]
                    prod = coupled[x][l1][:, :, c0:c0 + 2 * big_l + 1]
                    out.append((prod * t_y[big_l]).sum(-1))
        return torch.cat(out, dim=1)

    def _chirality(self, raw: torch.Tensor) -> torch.Tensor:
        """(E, n_chi) pseudo-scalars of the bonds from the raw ones: standardized, mixed,
        squashed by tanh (odd, so a mirror image still flips their sign)."""
        raw = raw / self.chi_scale.to(raw.dtype)
        return torch.tanh(raw @ self.chi_mix.to(raw.dtype).T)

    def _with_chirality(self, feats: dict[tuple[int, bool], torch.Tensor],
                        base: dict[tuple[int, bool], torch.Tensor], chi: torch.Tensor
                        ) -> dict[tuple[int, bool], torch.Tensor]:
        """Append pseudo-scalar x proper-feature channels (bond harmonic, both ends' tensors)
        to the pseudo-tensor features ``feats[(L, True)]``, L >= 1."""
        out = dict(feats)
        for (big_l, _), v in base.items():
            if big_l == 0:
                continue
            extra = (chi[:, :, None, None] * v[:, None]).flatten(1, 2)
            key = (big_l, True)
            out[key] = torch.cat([out[key], extra], dim=1) if key in out else extra
        return out

    @torch.no_grad()
    def set_chirality_scale(self, g: DPGraph) -> None:
        """RMS of every raw pseudo-scalar over the environment-seeing bonds of ``g``."""
        vec_ff = self._vectors(g.positions, g.cell, g.batch, g.ff_i, g.ff_j, g.ff_shift)
        env = self.env_tensors(g, vec_ff)
        vec = self._vectors(g.positions, g.cell, g.batch, g.h_i, g.h_j, g.h_shift)
        ys = [o3.spherical_harmonics(big_l, vec, normalize=True)[:, None, :]
              for big_l in range(self.lmax_feat + 1)]
        same = g.layer[g.h_i] == g.layer[g.h_j]
        m = (same | torch.as_tensor(self.interlayer_environment)).nonzero()[:, 0]
        i, j = g.h_i[m], g.h_j[m]
        coupled = [self._bond_couplings(ys, env, end, m) for end in (i, j)]
        raw = self._raw_chirality(coupled, env, i, j)
        rms = raw.pow(2).mean(0).sqrt()
        # components that vanish on every bond (by symmetry) keep scale 1
        self.chi_scale.copy_(torch.where(rms > 1e-12, rms, torch.ones_like(rms)))

    def _bond_couplings(self, ys: list[torch.Tensor], env: list[torch.Tensor],
                        end: torch.Tensor, m: torch.Tensor) -> dict[int, torch.Tensor]:
        """{L1: (E, C, cols)}: Y_L1(r_ij) (x) T^L2_end coupled to every product path's L
        (columns ``product_columns``), one matmul per L1."""
        top = self.lmax_feat
        t = torch.cat([env[l2][end] for l2 in range(1, top + 1)], dim=2)  # (E, C, width)
        coupled = {}
        for l1 in range(1, top + 1):
            y = ys[l1][m][:, 0]                                            # (E, 2L1+1)
            outer = (y[:, None, :, None] * t[:, :, None, :]).flatten(2)
            coupled[l1] = outer @ getattr(self, f"tp_{l1}").to(t.dtype)   # (E, C, cols)
        return coupled

    def _with_bond_products(self, feats: dict[tuple[int, bool], torch.Tensor],
                            coupled: list[dict[int, torch.Tensor]]
                            ) -> dict[tuple[int, bool], torch.Tensor]:
        """Add (Y_L1(r_ij) (x) T^L2_i)_L and (... T^L2_j)_L channels: appended to the proper
        ``feats[(L, False)]``, and as new pseudo-tensor features ``feats[(L, True)]``.
        ``coupled``: ``_bond_couplings`` of ends i and j."""
        extra: dict[tuple[int, bool], list[torch.Tensor]] = {k: [] for k in self.product_paths}
        for c_end in coupled:
            for (big_l, pseudo), paths in self.product_paths.items():
                for l1, l2 in paths:
                    c0 = self.product_columns[(l1, l2, big_l, pseudo)]
                    extra[(big_l, pseudo)].append(c_end[l1][:, :, c0:c0 + 2 * big_l + 1])
        out = dict(feats)
        for key, parts in extra.items():
            out[key] = torch.cat([feats[key], *parts], dim=1) if key in feats else \
                torch.cat(parts, dim=1)
        return out

    def _bond_invariants(self, ys: list[torch.Tensor], env: list[torch.Tensor],
                         i: torch.Tensor, j: torch.Tensor, m: torch.Tensor
                         ) -> list[torch.Tensor]:
        """Y_L(r_ij) . T^L_i and Y_L(r_ij) . T^L_j for L = 1..2 lmax: two (E, C*2lmax).

        Both factors have parity (-1)^L, so the dot products are O(3) invariants.
        """
        proj_i = [(ys[big_l][m] * env[big_l][i]).sum(-1) for big_l in range(1, len(env))]
        proj_j = [(ys[big_l][m] * env[big_l][j]).sum(-1) for big_l in range(1, len(env))]
        return [torch.cat(proj_i, dim=1), torch.cat(proj_j, dim=1)]

    # ---- Bloch sums in torch (for band-energy losses) -------------------------------------
    def bloch_eigenvalues(self, g: DPGraph, onsite: torch.Tensor, hop: torch.Tensor,
                          b: int, kpts: torch.Tensor) -> torch.Tensor:
        """Eigenvalues (nk, norb) of H(k) = sum_R e^{2 pi i k.R} H(R) of structure ``b``.

        Differentiable (torch.linalg.eigvalsh), for fitting band energies directly.
        """
        atoms = (g.batch == b).nonzero()[:, 0]
        n0 = int(atoms[0])
        species = g.species[atoms]
        norb = torch.as_tensor(self.norb)[species]
        off = torch.cat([norb.new_zeros(1), torch.cumsum(norb, 0)])
        total = int(off[-1])
        om = self.orbital_mask(species)
        ar = torch.arange(self.nmax)
        # on-site entries
        r_on = (off[:-1, None, None] + ar[None, :, None]).expand(-1, -1, self.nmax)
        c_on = (off[:-1, None, None] + ar[None, None, :]).expand(-1, self.nmax, -1)
        m_on = om[:, :, None] & om[:, None, :]
        edges = (g.batch[g.h_i] == b).nonzero()[:, 0]
        li, lj = g.h_i[edges] - n0, g.h_j[edges] - n0
        r_h = (off[li][:, None, None] + ar[None, :, None]).expand(-1, -1, self.nmax)
        c_h = (off[lj][:, None, None] + ar[None, None, :]).expand(-1, self.nmax, -1)
        m_h = om[li][:, :, None] & om[lj][:, None, :]
        cdtype = torch.complex128 if onsite.dtype == torch.float64 else torch.complex64
        h_on = onsite[atoms][m_on].to(cdtype)
        h_hop = hop[edges]
        shifts = g.h_shift[edges].to(onsite.dtype)
        out = []
        for k in kpts.to(onsite.dtype):
            phase = torch.exp(2j * math.pi * (shifts @ k)).to(cdtype)
            vals = (h_hop.to(cdtype) * phase[:, None, None])[m_h]
            hk = torch.zeros((total, total), dtype=cdtype)
            hk = hk.index_put((r_on[m_on], c_on[m_on]), h_on, accumulate=True)
            hk = hk.index_put((r_h[m_h], c_h[m_h]), vals, accumulate=True)
            hk = 0.5 * (hk + hk.conj().T)
            out.append(torch.linalg.eigvalsh(hk))
        return torch.stack(out)

    # ---- normalization from data -------------------------------------------------------
    @torch.no_grad()
    def set_descriptor_stats(self, g: DPGraph) -> None:
        """Set the descriptor mean/std (inputs of the fitting and on-site nets) from data."""
        vec = self._vectors(g.positions, g.cell, g.batch, g.ff_i, g.ff_j, g.ff_shift)
        d = self.descriptor(g.species, g.ff_i, g.ff_j, vec.to(self.d_mean.dtype))
        self.d_mean.copy_(d.mean(0))
        # Pooled over species, unlike the correction's option: the heads' RAER depends on
        # this normalization, so it stays as the shipped models have it.
        self.d_std.copy_(floored_spread(d))
        if self.correction is not None:
            self.correction.set_stats(g.species, g.ff_i, g.ff_j, vec.to(self.d_mean.dtype))
        if self.bond_chirality:
            self.set_chirality_scale(g)

    def orbital_mask(self, species: torch.Tensor) -> torch.Tensor:
        """(N, nmax) bool: which padded orbital slots are real for each atom."""
        norb = torch.as_tensor(self.norb)[species]
        return torch.arange(self.nmax)[None, :] < norb[:, None]
