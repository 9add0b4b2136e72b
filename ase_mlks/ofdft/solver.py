"""Energy minimization of the DL functional: in the VAE latent space, and naively in density space.

Latent descent (Costa et al., Eq. 14): minimize E[z] = F[D(z)] + int V D(z) over z with
Adam (or plain gradient descent) and autograd, from the mean encoding of the training set;
positivity and normalization are built into the decoder.  Density descent (Eq. 10):
n <- n - eta (dF/dn + V - mu) with mu keeping int n = 1, the unstable baseline.
Energies in E0, densities in 1/a0^ndim on the testbed grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .model import OFDFTModel

# Default descent settings per testbed (normalized latent units, see ``latent_descent``).
DESCENT_DEFAULTS = {"steps": 400, "lr": 0.1, "lr_final": 1e-3}
# The descent stays inside the region the training encodings cover: each normalized latent
# coordinate u_i = (z_i - z_init_i) / z_std_i is mapped through b tanh(w_i / b), b the VAE's
# ``latent_box`` (default U_MAX).  Far outside it the decoder extrapolates to profiles the
# functional never saw and the descent exploits the functional's errors (measured: -1 E0
# violations on gauss1d without it).
U_MAX = 3.0
# Plain-GD step of the naive density descent (a0^ndim E0^-1 per step), per testbed: the
# largest step of a x3 ladder with no divergence in 400 steps on 20 validation potentials
# with the session-4 functionals (whose |grad n|^2/n input makes them stiff: gauss1d
# diverged for every potential at 3e-5, speckle1d at 3e-4).
DENSITY_ETA = {"gauss1d": 1e-6, "speckle1d": 1e-4, "gauss3d": 2e-4}

_MODEL_CACHE: dict[str, OFDFTModel] = {}


def load_model(model: str | Path | OFDFTModel = "gauss3d") -> OFDFTModel:
    """A trained ``OFDFTModel`` from a shipped name ('gauss1d', ...), a path, or an instance."""
    if isinstance(model, OFDFTModel):
        return model.eval()
    key = str(model)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = OFDFTModel.load(model).eval()
    return _MODEL_CACHE[key]


@dataclass
class OFDFTResult:
    """Result of one minimization: ``energy`` (E0), ``density`` (grid of ``potential``),
    ``latent`` (l_d,) (None for density descent), ``steps`` taken, energy ``history``."""

    energy: float
    density: np.ndarray
    latent: np.ndarray | None
    steps: int
    history: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


@contextlib.contextmanager
def _frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """Switch weight gradients off (descents need dE/dz or dE/dn only: halves the backward
    cost), and restore each parameter's flag afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _as_batch(potential: np.ndarray | torch.Tensor, shape: tuple[int, ...]
              ) -> tuple[torch.Tensor, bool]:
    v = torch.as_tensor(np.asarray(potential, dtype=np.float32))
    if tuple(v.shape) == shape:
        return v.unsqueeze(0), True
    if tuple(v.shape[1:]) == shape:
        return v, False
    raise ValueError(f"potential has shape {tuple(v.shape)}; this model's grid is {shape} "
                     f"(or a batch (B, *{shape}))")


def latent_descent(model: OFDFTModel, potentials: torch.Tensor, *, steps: int | None = None,
                   lr: float | None = None, lr_final: float | None = None,
                   optimizer: str = "adam", z0: torch.Tensor | None = None, tol: float = 1e-8,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, np.ndarray]:
    """Minimize E[z] for a batch of potentials (B, *shape) (E0).

    The optimizer works on w with z = z_init + z_std b tanh(w / b), b = ``vae.latent_box``,
    so ``lr`` is in units of the spread of the training encodings whatever beta is, and z
    stays within b spreads of the mean; the rate decays exponentially to ``lr_final``.
    Stops early once no energy changed by more than ``tol`` E0 over 20 steps.
    Returns (z (B, l_d), energies (B,), densities (B, *shape), steps, history (steps, B)).
    """
    steps = steps or DESCENT_DEFAULTS["steps"]
    lr = lr or DESCENT_DEFAULTS["lr"]
    lr_final = lr_final or DESCENT_DEFAULTS["lr_final"]
    vae = model.vae
    b = potentials.shape[0]
    scale = vae.z_std.clamp_min(1e-6)
    start = z0 if z0 is not None else vae.z_init.expand(b, -1)
    box = vae.latent_box
    u0 = ((start - vae.z_init) / scale).clamp(-0.999 * box, 0.999 * box)
    u = (box * torch.atanh(u0 / box)).detach().clone().requires_grad_(True)
    if optimizer == "lbfgs":
        return _latent_lbfgs(model, potentials, u, scale, steps, tol)
    if optimizer == "adam":
        opt = torch.optim.Adam([u], lr=lr)
    elif optimizer == "gd":
        opt = torch.optim.SGD([u], lr=lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'adam', 'gd' or 'lbfgs'")
    gamma = (lr_final / lr) ** (1.0 / max(steps - 1, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    history = []
    with _frozen_weights(model):
        step = 0
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            e, _ = model.energy(_to_z(vae, u), potentials)
            e.sum().backward()  # instances are independent (BatchNorm in eval mode)
            opt.step()
            sched.step()
            history.append(e.detach().numpy().copy())
            if step > 20 and np.abs(history[-1] - history[-21]).max() < tol:
                break
        with torch.no_grad():
            z = _to_z(vae, u.detach())
            e, n = model.energy(z, potentials)
    return z, e, n, step, np.asarray(history)


def _to_z(vae, w: torch.Tensor) -> torch.Tensor:
    """Latent vector from the unconstrained descent variable w (see U_MAX)."""
    box = vae.latent_box
    return vae.z_init + vae.z_std.clamp_min(1e-6) * box * torch.tanh(w / box)


def _latent_lbfgs(model: OFDFTModel, potentials: torch.Tensor, u: torch.Tensor,
                  scale: torch.Tensor, steps: int, tol: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, np.ndarray]:
    """Quasi-Newton (L-BFGS, strong-Wolfe line search) variant of the latent descent.

    The instances are independent, so minimizing the sum of their energies minimizes each;
    ``steps`` bounds the energy evaluations.  Converges tightly in few evaluations, which the
    Hellmann-Feynman forces of ``OFDFTCalc`` need (they assume dE/dz = 0).
    """
    vae = model.vae
    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=steps, max_eval=steps, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=tol * 1e-2,
                            line_search_fn="strong_wolfe")
    history: list[np.ndarray] = []

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        e, _ = model.energy(_to_z(vae, u), potentials)
        history.append(e.detach().numpy().copy())
        total = e.sum()
        total.backward()
        return total

    with _frozen_weights(model):
        opt.step(closure)
        with torch.no_grad():
            z = _to_z(vae, u.detach())
            e, n = model.energy(z, potentials)
    return z, e, n, len(history), np.asarray(history)


def density_descent(model: OFDFTModel, potentials: torch.Tensor, *, steps: int | None = None,
                    eta: float | None = None, n0: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, int, np.ndarray]:
    """Naive gradient descent of E[n] = F[n] + int V n directly on the grid density.

    n_{t+1} = n_t - eta (dF/dn + V - mu_t), with dF/dn the functional derivative (gradient
    over dv) and mu_t the grid mean of dF/dn + V, which keeps int n = 1.  Positivity is not
    enforced, as in the paper.  Starts from the decoded mean encoding unless ``n0`` is given.
    An instance whose next step would be non-finite has diverged: it keeps its last finite
    density (so its numbers stay inspectable) and its history is NaN from then on.
    Returns (energies (B,), densities (B, *shape), steps, history (steps, B)).
    """
    steps = steps or DESCENT_DEFAULTS["steps"]
    eta = eta or DENSITY_ETA.get(model.testbed, 1e-4)
    dv = model.vae.dv
    b = potentials.shape[0]
    with torch.no_grad():
        n = n0.clone() if n0 is not None else model.vae.decode(
            model.vae.z_init.expand(b, -1)).clone()
    dims = tuple(range(1, n.ndim))
    history = []
    diverged = torch.zeros(b, dtype=torch.bool)
    shape = (-1,) + (1,) * (n.ndim - 1)
    n_prev = n
    with _frozen_weights(model):
        for _ in range(steps):
            n.requires_grad_(True)
            f = model.functional(n)
            (grad,) = torch.autograd.grad(f.sum(), n)
            with torch.no_grad():
                n = n.detach()
                e = f + (potentials * n).flatten(1).sum(1) * dv
                blown = ~torch.isfinite(e) & ~diverged  # back to the last finite energy
                n = torch.where(blown.view(shape), n_prev, n)
                diverged |= blown
                history.append(torch.where(diverged, torch.nan, e).numpy().copy())
                g = grad / dv + potentials
                mu = g.mean(dim=dims, keepdim=True)
                step = n - eta * (g - mu)
                diverged |= ~torch.isfinite(step).flatten(1).all(1)
                n_prev = n
                n = torch.where(diverged.view(shape), n, step)
        with torch.no_grad():
            e = model.functional(n) + (potentials * n).flatten(1).sum(1) * dv
    return e, n, steps, np.asarray(history)


def solve(potential: np.ndarray, model: str | Path | OFDFTModel = "gauss3d", *,
          steps: int | None = None, lr: float | None = None, optimizer: str = "adam",
          z0: np.ndarray | None = None) -> OFDFTResult | list[OFDFTResult]:
    """Ground state of ``potential`` (E0, the testbed's grid, or a batch of them) by latent descent.

    Returns an ``OFDFTResult`` (a list of them for a batch) with ``energy`` in E0 and
    ``density`` on the same grid as ``potential``.
    """
    m = load_model(model)
    v, single = _as_batch(potential, m.vae.shape)
    start = None if z0 is None else torch.as_tensor(np.asarray(z0, np.float32)).reshape(
        -1, m.vae.latent_dim).expand(v.shape[0], -1)
    z, e, n, nsteps, hist = latent_descent(m, v, steps=steps, lr=lr, optimizer=optimizer,
                                           z0=start)
    results = [OFDFTResult(float(e[i]), n[i].numpy().astype(np.float64), z[i].numpy(), nsteps,
                           hist[:, i] if hist.size else hist) for i in range(v.shape[0])]
    return results[0] if single else results


def integrated_density_error(n_a: np.ndarray, n_b: np.ndarray, dv: float) -> np.ndarray:
    """int |n_a - n_b| (dimensionless) per instance of two batches (B, *shape)."""
    d = np.abs(np.asarray(n_a, float) - np.asarray(n_b, float))
    return d.reshape(d.shape[0], -1).sum(1) * dv
