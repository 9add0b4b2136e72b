"""The DeepH-Zero loss E[H] and variational DFT (minimization over H without a network).

Free energy (Mermin, Fermi-Dirac smearing sigma, Ha per molecule / cell)::

    A[H] = E_DFT[D(H)] - sigma * S[D(H)]

Its gradient needs no labels: dE/dD = F[D] (the Kohn-Sham matrix the engine builds anyway),
back-propagated through D(H) (``density.py``). A alone fixes H only up to H + c S and, with
a gap much larger than sigma, leaves the occupied-occupied and virtual-virtual blocks
almost free; the label-free self-consistency term

    C[H] = (lambda / 2) sum_k w_k || H(k) - F[D(H)](k) ||_F^2

removes both. With ``sc_gradient="exact"`` the dependence of F on H is differentiated too
(through the engine's linear response K = dF/dD), so A + C is one smooth objective that
L-BFGS can minimize; ``"detached"`` treats F as a fixed target (cheaper; for training).
Both terms vanish together only at the SCF solution H = F[D(H)].
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .density import DensityResult, density_matrix, orthogonalizer
from .engine import HARTREE, DFTEngine, SCFResult


class _LinearEnergy(torch.autograd.Function):
    """E(D) with the precomputed gradient w_k F(k) (E and F computed by the engine)."""

    @staticmethod
    def forward(ctx, dm, energy, grad):  # noqa: D102
        ctx.save_for_backward(grad)
        return energy.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return g * grad, None, None


class _SelfConsistency(torch.autograd.Function):
    """C = (lam/2) sum_k w_k ||H - F[D]||^2 with dC/dD = -lam w K[R] (K: engine response)."""

    @staticmethod
    def forward(ctx, H, dm, resid, wl, response_factory):  # noqa: D102
        ctx.save_for_backward(resid, wl)
        ctx.factory = response_factory
        return 0.5 * (wl[:, None, None] * resid.abs() ** 2).sum()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        resid, wl = ctx.saved_tensors
        grad_h = g * wl[:, None, None] * resid
        grad_dm = None
        if ctx.factory is not None and ctx.needs_input_grad[1]:
            kr = ctx.factory()(resid.numpy())
            grad_dm = -g * wl[:, None, None] * torch.from_numpy(kr).to(resid.dtype)
        return grad_h, grad_dm, None, None, None


@dataclass
class FreeEnergyTerms:
    """One evaluation of the DeepH-Zero objective for one structure."""

    loss: torch.Tensor            # A + C (Ha), differentiable
    free_energy: torch.Tensor     # A = E - sigma S (Ha), differentiable
    energy: float                 # E[D(H)] (Ha)
    entropy: float
    sc: float                     # C (Ha)
    fock: np.ndarray              # F[D(H)] (nk, n, n)
    density: DensityResult


class FreeEnergy:
    """The label-free objective of one structure: engine + overlap + smearing (Ha units).

    ``evaluate(H)`` takes H (nk, n, n) as a torch tensor (float64 / complex128, our orbital
    order) and returns :class:`FreeEnergyTerms`; ``loss.backward()`` gives dL/dH.
    """

    def __init__(self, engine: DFTEngine, sigma: float = 0.01, sc_weight: float = 1.0,
                 sc_gradient: str = "detached"):
        if sc_gradient not in ("exact", "detached"):
            raise ValueError("sc_gradient must be 'exact' or 'detached'")
        self.engine = engine
        self.sigma = float(sigma)
        self.sc_weight = float(sc_weight)
        self.sc_gradient = sc_gradient
        S = engine.overlap()
        self.dtype = torch.complex128 if np.iscomplexobj(S) else torch.float64
        self.S = torch.from_numpy(S).to(self.dtype)
        self.X = torch.from_numpy(orthogonalizer(S)).to(self.dtype)
        self.weights = torch.from_numpy(np.asarray(engine.kweights, dtype=float))
        self.n_evaluations = 0

    def density(self, H: torch.Tensor) -> DensityResult:
        return density_matrix(H, self.X, self.weights, self.engine.nelectron, self.sigma)

    def evaluate(self, H: torch.Tensor) -> FreeEnergyTerms:
        dens = self.density(H)
        dm_np = dens.dm.detach().numpy()
        energy, fock = self.engine.energy_and_fock(dm_np)
        self.n_evaluations += 1
        w = self.weights
        fock_t = torch.from_numpy(fock).to(self.dtype)
        e_t = _LinearEnergy.apply(dens.dm, torch.tensor(energy, dtype=torch.float64),
                                  w[:, None, None].to(self.dtype) * fock_t)
        free = e_t - self.sigma * dens.entropy
        loss = free
        sc_val = 0.0
        if self.sc_weight > 0:
            resid = (H.detach() - fock_t)
            wl = w * self.sc_weight
            factory = None
            if self.sc_gradient == "exact":
                mo, occ = dens.mo_coeff.numpy(), dens.occ.detach().numpy()
                resp = getattr(self.engine, "response", None)
                if resp is None:
                    raise ValueError("sc_gradient='exact' needs an engine with response()")

                def factory(mo=mo, occ=occ):
                    return resp(mo, occ)
            sc = _SelfConsistency.apply(H, dens.dm, resid, wl, factory)
            sc_val = float(sc.detach())
            loss = loss + sc
        return FreeEnergyTerms(loss=loss, free_energy=free, energy=energy,
                               entropy=float(dens.entropy.detach()), sc=sc_val, fock=fock,
                               density=dens)


    def evaluate_frozen(self, H: torch.Tensor, fock: np.ndarray, energy: float,
                        dm: np.ndarray) -> FreeEnergyTerms:
        """Objective with the Kohn-Sham matrix frozen at ``fock`` (from density ``dm``).

        E is linearized: E(D) ~ energy + sum_k w_k tr(F (D - dm)); exact to first order, and
        its minimizer over H is H = F (+ c S), like one Roothaan step. Costs no engine call:
        used between refreshes of F during training (``DeepHZeroLoss(refresh_every=k)``).
        """
        dens = self.density(H)
        w = self.weights
        fock_t = torch.from_numpy(fock).to(self.dtype)
        grad = w[:, None, None].to(self.dtype) * fock_t
        delta = torch.sum((grad.conj() * (dens.dm.detach() - torch.from_numpy(dm).to(self.dtype)))
                          .real)
        e_val = torch.tensor(energy, dtype=torch.float64) + delta
        e_t = _LinearEnergy.apply(dens.dm, e_val, grad)
        free = e_t - self.sigma * dens.entropy
        loss = free
        sc_val = 0.0
        if self.sc_weight > 0:
            resid = H.detach() - fock_t
            sc = _SelfConsistency.apply(H, dens.dm, resid, w * self.sc_weight, None)
            sc_val = float(sc.detach())
            loss = loss + sc
        return FreeEnergyTerms(loss=loss, free_energy=free, energy=float(e_val),
                               entropy=float(dens.entropy.detach()), sc=sc_val, fock=fock,
                               density=dens)


class Anderson:
    """DIIS / Anderson extrapolation of the fixed-point map H -> F[D(H)] (per structure).

    ``update(H, F)`` stores the pair and returns sum_j c_j F_j with sum_j c_j = 1 minimizing
    || sum_j c_j (F_j - H_j) || -- Pulay's acceleration applied to training targets.
    """

    def __init__(self, size: int = 6):
        self.size = size
        self.h: list[np.ndarray] = []
        self.f: list[np.ndarray] = []

    def update(self, h: np.ndarray, f: np.ndarray) -> np.ndarray:
        self.h.append(h)
        self.f.append(f)
        self.h, self.f = self.h[-self.size:], self.f[-self.size:]
        r = [np.ravel(fi - hi) for fi, hi in zip(self.f, self.h)]
        n = len(r)
        b = np.zeros((n + 1, n + 1))
        b[:n, :n] = np.real([[np.vdot(a, c) for c in r] for a in r])
        b[:n, n] = b[n, :n] = -1.0
        rhs = np.zeros(n + 1)
        rhs[n] = -1.0
        try:
            c = np.linalg.solve(b + 1e-14 * np.eye(n + 1) * (np.trace(b[:n, :n]) / n), rhs)[:n]
        except np.linalg.LinAlgError:
            return f
        return sum(ci * fi for ci, fi in zip(c, self.f))


def hermitian(a: torch.Tensor) -> torch.Tensor:
    """(A + A^H) / 2: Hermitian parametrization of H."""
    return 0.5 * (a + a.mH)


@dataclass
class VariationalResult:
    """Outcome of :func:`variational_dft` (history: one dict per optimizer step)."""

    hamiltonian: np.ndarray
    dm: np.ndarray
    free_energy: float             # Ha
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0


def initial_hamiltonian(engine: DFTEngine, guess: str = "atom") -> np.ndarray:
    """Starting H: 'core' (h, kinetic + external) or 'atom' (F of superposed atomic densities)."""
    if guess == "core":
        return engine.core_hamiltonian()
    mf = getattr(engine, "mf", None)
    if guess == "atom" and mf is not None:
        dm0 = engine._to_ours(engine._raw(mf.get_init_guess(key="minao")))
        return engine.energy_and_fock(dm0)[1]
    raise ValueError(f"unknown initial guess {guess!r}")


def compare(h: np.ndarray, dm: np.ndarray, ref: SCFResult) -> dict:
    """Mean absolute deviations from the SCF reference: H (eV) and D (electrons)."""
    return {"dH_eV": float(np.mean(np.abs(h - ref.fock))) * HARTREE,
            "dH_max_eV": float(np.max(np.abs(h - ref.fock))) * HARTREE,
            "drho": float(np.mean(np.abs(dm - ref.dm)))}


def variational_dft(engine: DFTEngine, sigma: float = 0.01, *, sc_weight: float = 1.0,
                    steps: int = 200, optimizer: str = "lbfgs", lr: float = 0.05,
                    guess: str = "atom", reference: SCFResult | None = None,
                    gtol: float = 1e-9, progress: bool = True,
                    callback: Callable[[dict], None] | None = None) -> VariationalResult:
    """Minimize A[H] + C[H] directly over H (the paper's validation of variational DFT).

    optimizer: "lbfgs" (strong-Wolfe line search, exact self-consistency gradient) or "adam"
    (detached self-consistency term). Stops when max |dL/dH| < gtol (Ha) or after ``steps``.
    """
    fe = FreeEnergy(engine, sigma=sigma, sc_weight=sc_weight,
                    sc_gradient="exact" if optimizer == "lbfgs" else "detached")
    h0 = torch.from_numpy(initial_hamiltonian(engine, guess)).to(fe.dtype)
    a = torch.nn.Parameter(h0.clone())
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([a], lr=1.0, max_iter=1, max_eval=25, history_size=30,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0,
                                tolerance_change=0.0)
    elif optimizer == "adam":
        opt = torch.optim.Adam([a], lr=lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    last: dict = {}

    def closure():
        opt.zero_grad()
        terms = fe.evaluate(hermitian(a))
        terms.loss.backward()
        last["terms"] = terms
        return terms.loss

    history: list[dict] = []
    stalled = 0
    t0 = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc=f"variational DFT ({optimizer})")
    for step in bar:
        opt.step(closure)
        # Report the state after the step (one extra evaluation, not counted as a step).
        with torch.enable_grad():
            a.grad = None
            h = hermitian(a)
            hleaf = h.detach().requires_grad_(True)
            terms = fe.evaluate(hleaf)
            terms.free_energy.backward(retain_graph=True)
            grad_e = hleaf.grad.detach().clone()
            hleaf.grad = None
            terms.loss.backward()
            grad_l = hleaf.grad.detach()
        rec = {"step": step + 1, "evaluations": fe.n_evaluations,
               "seconds": time.perf_counter() - t0,
               "free_energy_Ha": float(terms.free_energy.detach()), "energy_Ha": terms.energy,
               "sc_Ha": terms.sc,
               "grad_E_mean_eV": float(grad_e.abs().mean()),
               "grad_L_max": float(grad_l.abs().max()),
               "sc_residual_eV": float(np.mean(np.abs(h.detach().numpy() - terms.fock)))
               * HARTREE}
        if reference is not None:
            rec["dE_eV"] = (rec["free_energy_Ha"] - reference.free_energy) * HARTREE
            rec.update(compare(h.detach().numpy(), terms.density.dm.detach().numpy(),
                               reference))
        history.append(rec)
        if callback is not None:
            callback(rec)
        if progress:
            bar.set_postfix(dE=rec.get("dE_eV", rec["free_energy_Ha"]),
                            dH=rec.get("dH_eV", rec["sc_residual_eV"]))
        if rec["grad_L_max"] < gtol:
            break
        # L-BFGS at machine precision: the line search no longer moves H.
        stalled = stalled + 1 if len(history) > 1 and \
            history[-2]["free_energy_Ha"] == rec["free_energy_Ha"] else 0
        if stalled >= 3:
            break
    h = hermitian(a).detach()
    dens = fe.density(h)
    return VariationalResult(hamiltonian=h.numpy(), dm=dens.dm.detach().numpy(),
                             free_energy=history[-1]["free_energy_Ha"], history=history,
                             seconds=time.perf_counter() - t0, evaluations=fe.n_evaluations)


__all__ = ["Anderson", "FreeEnergy", "FreeEnergyTerms", "VariationalResult", "variational_dft",
           "initial_hamiltonian", "hermitian", "compare"]
