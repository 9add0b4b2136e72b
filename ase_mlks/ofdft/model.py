"""Networks of the VAE orbital-free DFT: a beta-VAE of ground-state densities and a CNN functional.

Both work on a 1D (N,) or 3D (N, N, N) grid; periodic testbeds use circular padding so the
networks respect the box's translation symmetry.  Densities are in 1/a0^ndim with
``dv * sum(n) = 1``; energies in E0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..core.checkpoint import CheckpointMixin

_CONV = {1: nn.Conv1d, 3: nn.Conv3d}
_POOL = {1: nn.AvgPool1d, 3: nn.AvgPool3d}
_NORM = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}


def _conv(ndim: int, cin: int, cout: int, kernel: int, periodic: bool) -> nn.Module:
    return _CONV[ndim](cin, cout, kernel, padding=kernel // 2,
                       padding_mode="circular" if periodic else "zeros")


class FourierUpsample(nn.Module):
    """Band-limited (trigonometric) interpolation of a periodic grid by an integer factor.

    Zero-pads the spectrum, so the smooth, low-k content of a periodic density is carried to
    the finer grid exactly, without the blocky artefacts of nearest-neighbour upsampling.
    Acts on the last ``ndim`` axes of (B, C, *grid); grid sizes odd or even.
    """

    def __init__(self, factor: int, ndim: int):
        super().__init__()
        self.factor, self.ndim = factor, ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self.ndim, 0))
        n = x.shape[-1]
        m = n * self.factor
        spec = torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)
        lo = m // 2 - n // 2  # puts the zero frequency at the centre of the padded spectrum
        pad = []
        for _ in dims:
            pad += [lo, m - n - lo]
        spec = nn.functional.pad(spec, pad)
        out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=dims), dim=dims).real
        return out * self.factor**self.ndim


class FourierDownsample(nn.Module):
    """Keep the lowest Fourier components of a periodic grid: (B, C, *[n]) -> (B, C, *[n//f]).

    The inverse of ``FourierUpsample`` on band-limited fields; used to run the 3D networks on
    a coarse grid (densities of the 3D testbed have negligible weight above |k| = 8 pi / L).
    """

    def __init__(self, factor: int, ndim: int):
        super().__init__()
        self.factor, self.ndim = factor, ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self.ndim, 0))
        n = x.shape[-1]
        m = n // self.factor
        spec = torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)
        lo = n // 2 - m // 2
        index = torch.arange(lo, lo + m, device=x.device)
        for d in dims:
            spec = spec.index_select(d, index)
        out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=dims), dim=dims).real
        return out / self.factor**self.ndim


def _reduced_size(size: int, pools: Sequence[int]) -> int:
    for p in pools:
        if size % p:
            raise ValueError(f"grid size {size} is not divisible by the pooling factors {pools}")
        size //= p
    return size


class DensityVAE(nn.Module, CheckpointMixin):
    """beta-VAE of density profiles (Costa et al., Table I), decoder output positive and normalized.

    Encoder: blocks Conv -> Softplus -> AvgPool -> BatchNorm, then two dense heads
    (``dense`` hidden sizes, then ``latent_dim``) for mu and log sigma^2.  Decoder: a linear
    map to the smallest feature map, blocks Upsample -> Conv -> Softplus -> BatchNorm mirroring
    the encoder, a last identity Conv, then sigmoid and the sum-rule normalization.
    ``upsample="fourier"`` (periodic grids) interpolates band-limited instead of nearest.

    shape: grid shape (N,) or (N, N, N); dv: volume element (a0^ndim); length: box edge (a0).
    """

    def __init__(self, shape: Sequence[int], dv: float, length: float, periodic: bool,
                 latent_dim: int = 8, channels: Sequence[int] = (16, 16, 16, 16, 16),
                 pools: Sequence[int] = (2, 2, 2, 2, 2), kernel: int = 13,
                 dense: Sequence[int] = (100, 50), beta: float = 1e-4, testbed: str = "",
                 upsample: str = "nearest", coarsen: int = 1):
        super().__init__()
        self.hparams = dict(shape=list(shape), dv=dv, length=length, periodic=periodic,
                            latent_dim=latent_dim, channels=list(channels), pools=list(pools),
                            kernel=kernel, dense=list(dense), beta=beta, testbed=testbed,
                            upsample=upsample, coarsen=coarsen)
        if upsample not in ("nearest", "fourier") or (upsample == "fourier" and not periodic):
            raise ValueError("upsample must be 'nearest' or, for periodic grids, 'fourier'")
        if len(channels) != len(pools):
            raise ValueError("channels and pools need one entry per convolutional block")
        self.shape = tuple(shape)
        self.ndim = len(shape)
        self.dv = dv
        self.beta = beta
        self.latent_dim = latent_dim
        if coarsen > 1 and not periodic:
            raise ValueError("coarsen > 1 (Fourier coarse grid) needs a periodic grid")
        self.coarsen = coarsen
        small = _reduced_size(self.shape[0] // coarsen, pools)
        self._small_shape = (channels[-1],) + (small,) * self.ndim
        nd = self.ndim
        enc: list[nn.Module] = []
        cin = 1
        for c, p in zip(channels, pools):
            enc += [_conv(nd, cin, c, kernel, periodic), nn.Softplus()]
            if p > 1:
                enc.append(_POOL[nd](p))
            enc.append(_NORM[nd](c))
            cin = c
        if coarsen > 1:
            enc.insert(0, FourierDownsample(coarsen, nd))
            self.refine = FourierUpsample(coarsen, nd)
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        nfeat = math.prod(self._small_shape)

        def head() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = nfeat
            for h in dense:
                layers += [nn.Linear(width, h), nn.Softplus()]
                width = h
            layers.append(nn.Linear(width, latent_dim))
            return nn.Sequential(*layers)

        self.mu_head = head()
        self.logvar_head = head()
        # Start with a narrow posterior (sigma ~ 0.05): with sigma ~ 1 the sampling noise
        # swamps the small density variations and the decoder learns to ignore z.
        with torch.no_grad():
            self.logvar_head[-1].weight.mul_(0.01)
            self.logvar_head[-1].bias.fill_(-6.0)
        self.decoder_in = nn.Linear(latent_dim, nfeat)
        dec: list[nn.Module] = []
        rev = list(channels[::-1]) + [1]
        for i, p in enumerate(pools[::-1]):
            if p > 1:
                dec.append(FourierUpsample(p, nd) if upsample == "fourier"
                           else nn.Upsample(scale_factor=p, mode="nearest"))
            dec.append(_conv(nd, rev[i], rev[i + 1], kernel, periodic))
            if i + 1 < len(pools):  # the last block has the identity activation
                dec += [nn.Softplus(), _NORM[nd](rev[i + 1])]
        self.decoder = nn.Sequential(*dec)
        # initial point of the latent descent: the mean encoding of the training set
        self.register_buffer("z_init", torch.zeros(latent_dim))
        # spread of the training encodings: the latent descent works in units of it
        self.register_buffer("z_std", torch.ones(latent_dim))

    def encode(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Densities (B, *shape) -> (mu, logvar), each (B, latent_dim)."""
        h = self.encoder((n * self.dv * self._npts()).unsqueeze(1))  # scaled to mean 1
        return self.mu_head(h), self.logvar_head(h)

    def _npts(self) -> int:
        return math.prod(self.shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_dim) -> densities (B, *shape), positive, dv * sum = 1."""
        h = self.decoder(self.decoder_in(z).view(-1, *self._small_shape))
        if self.coarsen > 1:  # logits on the coarse grid, interpolated band-limited
            h = self.refine(h)
        s = torch.sigmoid(h.squeeze(1))
        norm = s.flatten(1).sum(1) * self.dv
        return s / norm.view(-1, *([1] * self.ndim))

    def forward(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterized pass: (reconstruction, mu, logvar); uses mu at eval time."""
        mu, logvar = self.encode(n)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar

    def loss(self, n: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L = L_rec + beta L_reg per instance (batch mean).

        L_rec = 1/2 sum_grid (n_hat - n)^2 (Gaussian decoder of unit variance, up to a
        constant); L_reg = KL(N(mu, sigma) || N(0, 1)).  Also reports the integrated
        absolute error int |n_hat - n| (dimensionless).
        """
        rec, mu, logvar = self(n)
        diff = (rec - n).flatten(1)
        l_rec = 0.5 * (diff**2).sum(1).mean()
        l_reg = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
        loss = l_rec + self.beta * l_reg
        l1 = diff.detach().abs().sum(1).mean() * self.dv
        return loss, {"rec": float(l_rec.detach()), "kl": float(l_reg.detach()), "n_l1": float(l1)}


class FunctionalCNN(nn.Module, CheckpointMixin):
    """DL functional F[n] = e_gs - int V n (E0) (Costa et al., Table II).

    Blocks Conv -> Softplus -> AvgPool, then a linear projector to one number.  The input is
    scaled to mean 1 and the output de-standardized with the training-set mean and std of F.
    """

    def __init__(self, shape: Sequence[int], dv: float, periodic: bool,
                 channels: Sequence[int] = (16, 16, 16, 16, 16),
                 pools: Sequence[int] = (2, 2, 2, 2, 2), kernel: int = 13,
                 f_mean: float = 0.0, f_std: float = 1.0, testbed: str = "",
                 n_mean: float = 0.0, n_std: float = 1.0, coarsen: int = 1,
                 gradient_scale: float = 0.0):
        super().__init__()
        self.hparams = dict(shape=list(shape), dv=dv, periodic=periodic, channels=list(channels),
                            pools=list(pools), kernel=kernel, f_mean=f_mean, f_std=f_std,
                            testbed=testbed, n_mean=n_mean, n_std=n_std, coarsen=coarsen,
                            gradient_scale=gradient_scale)
        # gradient_scale > 0 (periodic grids): a second input channel |grad n|^2 / n / scale,
        # from spectral derivatives, so the convolutions need not learn derivatives first
        self.gradient_scale = float(gradient_scale)
        self.length = (dv ** (1.0 / len(shape))) * shape[0]
        # input standardization: 3D densities vary by only ~10 % around 1, too little for the
        # Softplus layers to see their curvature (F ~ int |grad n|^2 / 8n is quadratic)
        self.n_mean, self.n_std = float(n_mean), float(n_std)
        self.shape = tuple(shape)
        self.ndim = len(shape)
        self.dv = dv
        small = _reduced_size(self.shape[0] // coarsen, pools)
        self.coarse = FourierDownsample(coarsen, self.ndim) if coarsen > 1 else nn.Identity()
        layers: list[nn.Module] = []
        cin = 2 if gradient_scale > 0 else 1
        for c, p in zip(channels, pools):
            layers += [_conv(self.ndim, cin, c, kernel, periodic), nn.Softplus()]
            if p > 1:
                layers.append(_POOL[self.ndim](p))
            cin = c
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels[-1] * small**self.ndim, 1)
        self.register_buffer("f_mean", torch.tensor(float(f_mean)))
        self.register_buffer("f_std", torch.tensor(float(f_std)))

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        """Densities (B, *shape) -> F (B,) in E0."""
        x = self.coarse((n * self.dv * math.prod(self.shape)).unsqueeze(1))
        feats = [(x - self.n_mean) / self.n_std]
        if self.gradient_scale > 0:
            feats.append(self._gradient_feature(x) / self.gradient_scale)
        return self.head(self.body(torch.cat(feats, 1))).squeeze(-1) * self.f_std + self.f_mean

    def _gradient_feature(self, x: torch.Tensor) -> torch.Tensor:
        """|grad x|^2 / x by spectral derivatives on the (coarse) periodic grid, (B, 1, *g)."""
        dims = tuple(range(2, x.ndim))
        m = x.shape[-1]
        k = 2 * torch.pi * torch.fft.fftfreq(m, d=self.length / m, dtype=x.dtype)
        spec = torch.fft.fftn(x, dim=dims)
        g2 = torch.zeros_like(x)
        for axis in dims:
            shape = [1] * x.ndim
            shape[axis] = m
            g2 = g2 + torch.fft.ifftn(1j * k.view(shape) * spec, dim=dims).real ** 2
        return g2 / x.clamp_min(1e-3)

    def loss(self, n: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean squared error in standardized units; reports the MAE in E0."""
        pred = self(n)
        loss = (((pred - f) / self.f_std) ** 2).mean()
        return loss, {"mae_E0": float((pred - f).detach().abs().mean())}


# Architectures per testbed: the paper's layer counts and kernels, narrower channels so that
# each trains on one CPU core in tens of minutes (paper: 60 channels; 60/120/180 in 3D).
ARCHITECTURES: dict[str, dict[str, dict]] = {
    "gauss1d": {
        "vae": dict(latent_dim=4, channels=(16,) * 5, pools=(2,) * 5, kernel=13, beta=1e-4),
        "functional": dict(channels=(16,) * 5, pools=(2,) * 5, kernel=13),
    },
    "speckle1d": {
        "vae": dict(latent_dim=16, channels=(16,) * 5, pools=(2,) * 5, kernel=13, beta=1e-4,
                    upsample="fourier"),
        "functional": dict(channels=(16,) * 5, pools=(2,) * 5, kernel=13),
    },
    "gauss3d": {
        # both run on the 9^3 Fourier-coarsened grid (8x cheaper; see FourierDownsample)
        "vae": dict(latent_dim=32, channels=(16, 32, 32), pools=(3, 1, 1), kernel=3, beta=1e-6,
                    upsample="fourier", coarsen=2),
        "functional": dict(channels=(16, 16, 16, 16), pools=(1, 3, 3, 1), kernel=3,
                           standardize_input=True, coarsen=2, gradient_features=True),
    },
}


class OFDFTModel(nn.Module, CheckpointMixin):
    """A trained testbed: the density VAE and the DL functional in one checkpoint.

    ``OFDFTModel.load("gauss3d")`` reads ``ase_mlks/pretrained/ofdft-gauss3d.pt``.
    """

    pretrained_prefix = "ofdft-"

    def __init__(self, testbed: str, vae: dict, functional: dict):
        super().__init__()
        self.hparams = dict(testbed=testbed, vae=dict(vae), functional=dict(functional))
        self.testbed = testbed
        self.vae = DensityVAE(**vae)
        self.functional = FunctionalCNN(**functional)

    @classmethod
    def from_parts(cls, vae: DensityVAE, functional: FunctionalCNN) -> OFDFTModel:
        """Combine separately trained networks (weights copied)."""
        model = cls(vae.hparams["testbed"], vae.hparams, functional.hparams)
        model.vae.load_state_dict(vae.state_dict())
        model.functional.load_state_dict(functional.state_dict())
        return model.eval()

    def energy(self, z: torch.Tensor, potential: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E[z] = F[D(z)] + int V D(z): latent (B, l_d), potential (B, *shape) in E0.

        Returns (energies (B,) in E0, densities (B, *shape)).
        """
        n = self.vae.decode(z)
        e = self.functional(n) + (potential * n).flatten(1).sum(1) * self.vae.dv
        return e, n

    def forward(self, z: torch.Tensor, potential: torch.Tensor) -> torch.Tensor:
        return self.energy(z, potential)[0]
