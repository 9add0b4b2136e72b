"""Crystal VAE of Kohn–Sham states and the GW-correction head (Hou, Wu & Qiu 2024).

Layer plan (Table 1 of the paper, whose parameter counts fix the sizes: 40 z-slices as input
channels, 320 channels, 3x3 kernels, p = 30):

encoder  RotationalConv2d(40 -> C, 3x3, circular) + ReLU
         Conv2d(C -> C, 3x3, circular) + ReLU
         global average pooling (AdaptiveAvgPool2d(1)) + Flatten
         Linear(C -> 2p)                      -> mu, log sigma^2
decoder  Linear(p -> 32*7*7) + ReLU + Unflatten
         ConvTranspose2d(32 -> 60, 3, stride 2) + ReLU
         ConvTranspose2d(60 -> 40, 2, stride 2)
         adaptive layer (bilinear resize to the input grid) + Sigmoid

Symmetry, exact by construction for grid-aligned operations:

* origin: circular convolutions are equivariant to periodic shifts and the global average is
  invariant, so mu does not depend on where the unit cell starts;
* supercells: a tiled input gives tiled feature maps with the same average;
* lattice-vector choice: the rotational layer evaluates the first convolution on all 8 ways
  of ordering/orienting (a1, a2) on the index grid (the dihedral group D4: the paper's four
  scan directions and their mirror images) and keeps the orientation whose feature map has
  the largest sum. The set of 8 candidates is the same for any choice, so the kept one is too.

The decoder has no origin or orientation (the latent vector has none); it reconstructs the
input in the kept orientation (``VAEOutput.orientation``), and ``CrystalVAE.reconstruct``
maps the result back to the input's frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ase_mlks.core.checkpoint import CheckpointMixin

N_ORIENTATIONS = 8


def orient(x: torch.Tensor, g: int) -> torch.Tensor:
    """Apply lattice-vector choice ``g`` (0..7) to the last two (grid) axes.

    g = 4*m + r: optional swap of a1/a2 (m = 1), then r quarter turns of the index grid.
    """
    if g >= 4:
        x = x.transpose(-2, -1)
    return torch.rot90(x, g % 4, dims=(-2, -1))


def unorient(x: torch.Tensor, g: int) -> torch.Tensor:
    """Inverse of :func:`orient`."""
    x = torch.rot90(x, -(g % 4), dims=(-2, -1))
    return x.transpose(-2, -1) if g >= 4 else x


class RotationalConv2d(nn.Module):
    """Circular 2D convolution scanned along the 8 lattice-vector choices; per sample the
    orientation whose (ReLU) feature map has the largest mean is kept.

    ``select(x)`` scores all 8 orientations at once (no gradient): scanning the oriented
    input T_g x with kernel w has the same feature-map total as scanning x with the kernel
    T_g^-1 w, so one convolution with 8 kernel copies suffices. ``forward`` then runs the
    convolution on the inputs already put in their kept orientation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              padding_mode="circular")

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Kept orientation g (0..7) per sample, (B,) long."""
        w, b = self.conv.weight, self.conv.bias
        kernels = torch.cat([unorient(w, g) for g in range(N_ORIENTATIONS)])
        pad = self.conv.padding[0]
        xp = F.pad(x, (pad, pad, pad, pad), mode="circular")
        maps = F.relu(F.conv2d(xp, kernels, b.repeat(N_ORIENTATIONS)))
        scores = maps.view(x.shape[0], N_ORIENTATIONS, -1).double().mean(-1)
        # break exact ties (symmetric inputs) towards the lowest g, deterministically
        ramp = 1e-12 * torch.arange(N_ORIENTATIONS, dtype=scores.dtype)
        return torch.argmax(scores - ramp, dim=1)

    def forward(self, x_oriented: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x_oriented))


def canonical_groups(x: torch.Tensor, best: torch.Tensor
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs in their kept orientation, grouped by grid shape: [(batch indices, x_oriented)].

    One group when n1 == n2; a quarter turn swaps n1 and n2 otherwise.
    """
    by_shape: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for g in torch.unique(best).tolist():
        idx = torch.nonzero(best == g).flatten()
        xo = orient(x[idx], g)
        for i, row in zip(idx.tolist(), xo):
            by_shape.setdefault(tuple(xo.shape[-2:]), []).append((i, row))
    groups = []
    for rows in by_shape.values():
        idx = torch.tensor([i for i, _ in rows])
        groups.append((idx, torch.stack([r for _, r in rows])))
    return groups


@dataclass
class VAEOutput:
    """recon (B, nz, n1', n2') in the kept orientation; target = input in that orientation."""

    recon: torch.Tensor
    target: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    orientation: torch.Tensor


class CrystalVAE(nn.Module, CheckpointMixin):
    """Crystal VAE of one kind of real-space field (KS state, super state or density moduli).

    Input: (B, nz, n1, n2) moduli scaled to [0, 1] (each field divided by its maximum), any
    in-plane grid size. Latent: mu, log sigma^2 in R^p.
    """

    pretrained_prefix = "gw-"

    def __init__(self, in_channels: int = 40, channels: int = 320, latent: int = 30,
                 kernel_size: int = 3, dec_channels: tuple[int, int] = (32, 60),
                 dec_base: int = 7):
        super().__init__()
        self.hparams = dict(in_channels=in_channels, channels=channels, latent=latent,
                            kernel_size=kernel_size, dec_channels=list(dec_channels),
                            dec_base=dec_base)
        self.latent = latent
        self.rot = RotationalConv2d(in_channels, channels, kernel_size)
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                              padding_mode="circular")
        self.to_latent = nn.Linear(channels, 2 * latent)
        c0, c1 = dec_channels
        self.dec_shape = (c0, dec_base, dec_base)
        self.from_latent = nn.Linear(latent, c0 * dec_base * dec_base)
        self.up1 = nn.ConvTranspose2d(c0, c1, 3, stride=2)
        self.up2 = nn.ConvTranspose2d(c1, in_channels, 2, stride=2)

    # -- encoder ------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.hparams["in_channels"]:
            raise ValueError(f"CrystalVAE expects (B, {self.hparams['in_channels']}, n1, n2) "
                             f"moduli; got shape {tuple(x.shape)}")

    def _encode_groups(self, groups) -> tuple[torch.Tensor, torch.Tensor]:
        n = sum(len(idx) for idx, _ in groups)
        first = groups[0][1]
        pooled = first.new_zeros(n, self.hparams["channels"])
        for idx, xo in groups:
            h = F.relu(self.conv(self.rot(xo)))
            pooled = pooled.index_copy(0, idx, h.mean(dim=(2, 3)))  # global average pooling
        mu, logvar = self.to_latent(pooled).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, nz, n1, n2) -> mu (B, p), logvar (B, p), kept orientation (B,)."""
        self._check(x)
        best = self.rot.select(x)
        mu, logvar = self._encode_groups(canonical_groups(x, best))
        return mu, logvar, best

    # -- decoder ------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """z (B, p) -> moduli (B, nz, *size) in [0, 1] (adaptive final layer to ``size``)."""
        h = F.relu(self.from_latent(z)).view(z.shape[0], *self.dec_shape)
        h = self.up2(F.relu(self.up1(h)))
        h = F.interpolate(h, size=tuple(size), mode="bilinear", align_corners=False)
        return torch.sigmoid(h)

    def forward(self, x: torch.Tensor, sample: bool | None = None) -> VAEOutput:
        """Encode, sample z (training) or take z = mu (eval), decode in the kept orientation."""
        self._check(x)
        best = self.rot.select(x)
        groups = canonical_groups(x, best)
        mu, logvar = self._encode_groups(groups)
        sample = self.training if sample is None else sample
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        if len(groups) == 1:
            idx, xo = groups[0]
            inv = torch.argsort(idx)
            rec = self.decode(z[idx], xo.shape[-2:])[inv]
            return VAEOutput(rec, xo[inv], mu, logvar, best)
        # n1 != n2 with both grid shapes present: compare in the input frame instead
        rec = torch.empty_like(x)
        for idx, xo in groups:
            r = self.decode(z[idx], xo.shape[-2:])
            for j, i in enumerate(idx.tolist()):
                rec[i] = unorient(r[j], int(best[i]))
        return VAEOutput(rec, x, mu, logvar, torch.zeros_like(best))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (z = mu) in the input's own frame, (B, nz, n1, n2)."""
        out = self.forward(x, sample=False)
        rec = torch.empty_like(x)
        for g in torch.unique(out.orientation).tolist():
            idx = torch.nonzero(out.orientation == g).flatten()
            rec[idx] = unorient(out.recon[idx], g)
        return rec

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation e(phi) = mu (B, p)."""
        return self.encode(x)[0]


def vae_loss(out: VAEOutput, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE + beta * KL (Eq. 1); MSE is per grid point, KL per latent dimension summed."""
    mse = F.mse_loss(out.recon, out.target)
    kl = 0.5 * (-1 - out.logvar + out.logvar.exp() + out.mu**2).sum(dim=1).mean()
    return mse + beta * kl, mse, kl


class GWHead(nn.Module):
    """Dense network (three fully connected layers) from standardized features to Sigma_nk."""

    def __init__(self, in_features: int, hidden: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers - 1):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# Which inputs of Eq. (3) the head sees; "energy" alone is the baseline network. The
# reduced sets drop per-material context blocks: with ~10 training materials the 216
# context features (super states + density) can identify a material rather than describe it,
# so which set generalizes is chosen by leave-one-material-out validation (trainer).
FEATURE_SETS = {
    "full": ("state", "energy", "super", "density"),
    "state_density": ("state", "energy", "density"),
    "state_super": ("state", "energy", "super"),
    "state": ("state", "energy"),
    "energy": ("energy",),
}
FEATURE_ORDER = ("state", "energy", "super", "density")


class GWModel(nn.Module, CheckpointMixin):
    """Everything of Eq. (3): encoders e_theta (states), e_sup (super states), e_rho (density)
    and the GW head  Sigma_nk = f(e(phi_nk), eps_nk, e_sup(phi_sup), eps_sup, e_rho(rho)).

    Energies enter relative to the Fermi level (eV). ``head_trained`` records whether the
    head has been fitted to G0W0 data; an untrained head refuses to predict.
    """

    pretrained_prefix = "gw-"

    def __init__(self, vae: dict | None = None, super_vae: dict | None = None,
                 density_vae: dict | None = None, nz: int = 40, window: float = 10.0,
                 super_edges: tuple[float, ...] = (-9.0, -6.0, -3.0, 0.0, 3.0, 6.0, 9.0),
                 features: str = "full", head_hidden: int = 64, head_layers: int = 3):
        super().__init__()
        vae = dict(vae or {})
        super_vae = dict(super_vae or vae)
        density_vae = dict(density_vae or vae)
        for d in (vae, super_vae, density_vae):
            d.setdefault("in_channels", nz)
        self.hparams = dict(vae=vae, super_vae=super_vae, density_vae=density_vae, nz=nz,
                            window=window, super_edges=list(super_edges), features=features,
                            head_hidden=head_hidden, head_layers=head_layers)
        self.state_vae = CrystalVAE(**vae)
        self.super_vae = CrystalVAE(**super_vae)
        self.density_vae = CrystalVAE(**density_vae)
        self.nsuper = len(super_edges) - 1
        nfeat = self.feature_size(features)
        self.head = GWHead(nfeat, head_hidden, head_layers)
        self.register_buffer("feature_mean", torch.zeros(nfeat))
        self.register_buffer("feature_std", torch.ones(nfeat))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.register_buffer("head_trained", torch.zeros((), dtype=torch.bool))

    def feature_size(self, features: str) -> int:
        sizes = self._part_sizes()
        return sum(sizes[part] for part in FEATURE_SETS[features])

    @property
    def uses_context(self) -> bool:
        """Does the head read the material context (super states or density)?"""
        return bool({"super", "density"} & set(FEATURE_SETS[self.hparams["features"]]))

    def _part_sizes(self) -> dict[str, int]:
        return {"state": self.state_vae.latent, "energy": 1,
                "super": self.nsuper * (self.super_vae.latent + 1),
                "density": self.density_vae.latent}

    def feature_columns(self, features: str) -> np.ndarray:
        """Indices of the raw features of set ``features`` within this model's raw features
        (to train a head on a subset of the inputs without encoding the states again)."""
        own, sub = FEATURE_SETS[self.hparams["features"]], FEATURE_SETS[features]
        missing = [p for p in sub if p not in own]
        if missing:
            raise ValueError(f"feature set {features!r} needs {missing}, which a model with "
                             f"features={self.hparams['features']!r} does not compute")
        sizes, cols, start = self._part_sizes(), [], 0
        for part in FEATURE_ORDER:
            if part in own:
                if part in sub:
                    cols.append(np.arange(start, start + sizes[part]))
                start += sizes[part]
        return np.concatenate(cols)

    def with_features(self, features: str) -> GWModel:
        """A model with the same (trained) encoders and a fresh, untrained head on the inputs
        ``features`` (a key of FEATURE_SETS)."""
        new = GWModel(**{**self.hparams, "features": features})
        for name in ("state_vae", "super_vae", "density_vae"):
            getattr(new, name).load_state_dict(getattr(self, name).state_dict())
        return new

    @torch.no_grad()
    def context(self, super_x: torch.Tensor, super_energies: torch.Tensor,
                density_x: torch.Tensor) -> torch.Tensor:
        """Per-material features: super states (nsup, nz, n1, n2) scaled, their energies (nsup,)
        eV from E_F, density (nz, n1, n2) scaled -> (nsup*(p_sup+1) + p_rho,)."""
        mu_sup = self.super_vae.embed(super_x)
        mu_rho = self.density_vae.embed(density_x[None])[0]
        return torch.cat([torch.cat([mu_sup, super_energies[:, None].to(mu_sup)], 1).flatten(),
                          mu_rho])

    def features(self, mu_state: torch.Tensor, energy: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:
        """Raw head input (B, F) for states with latent ``mu_state`` (B, p) and energies (B,)
        (eV from E_F) of a material with ``context`` (from :meth:`context`)."""
        parts = FEATURE_SETS[self.hparams["features"]]
        cols = []
        if "state" in parts:
            cols.append(mu_state)
        if "energy" in parts:
            cols.append(energy[:, None].to(mu_state))
        nsup_feat = self.nsuper * (self.super_vae.latent + 1)
        if "super" in parts:
            cols.append(context[:nsup_feat].expand(len(energy), -1))
        if "density" in parts:
            cols.append(context[nsup_feat:].expand(len(energy), -1))
        return torch.cat(cols, dim=1)

    def forward(self, raw_features: torch.Tensor) -> torch.Tensor:
        """Sigma_nk (eV) from raw features (B, F)."""
        x = (raw_features - self.feature_mean) / self.feature_std
        return self.head(x) * self.target_std + self.target_mean
