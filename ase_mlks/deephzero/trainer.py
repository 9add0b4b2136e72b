"""Training DeepH-Zero networks: unsupervised (free energy + self-consistency term),
supervised (MSE to SCF Hamiltonians) and fine-tuning (supervised start, unsupervised finish).

The epoch loop, resumption, LR schedule, progress bars and checkpoints are the shared
``ase_mlks.core.training.Trainer``; this module provides the losses (one DFT engine per
training structure, built once and cached) and a command line that reproduces the shipped
models (see docs/deephzero.md)::

    python -m ase_mlks.deephzero.trainer --system h2o --mode unsupervised \
        --workdir runs/deephzero-h2o --out ase_mlks/pretrained/deephzero-h2o-pbe-svp.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ..core.checkpoint import hash_arrays
from ..core.training import Trainer, distributed_context
from .data import distorted_water, rattled_bcc_na, rattled_graphene, scf_references
from .engine import HARTREE, PySCFEngine
from .model import DeepHE3, aliased_hoppings, assemble_k, build_graph
from .variational import Anderson, FreeEnergy, initial_hamiltonian

SYSTEMS = {
    # name: (structure generator, engine keyword arguments, smearing (Ha), model kwargs)
    "h2o": (distorted_water, {"basis": "def2-svp", "xc": "PBE", "grid_level": 3}, 0.01,
            {"cutoff": 5.0, "avg_neighbors": 2.0}),
    # Na's gth-szv functions are diffuse: pairs beyond 7 Å still carry overlaps of 0.26
    # (PySCFEngine.overlap_truncation), so the cutoff is 11 Å (< 3e-3 missing); its hard
    # semicore 2s/2p need a fine FFT grid: at 20 Ha translating the cell changed on-site
    # levels by 80 eV, at 150 Ha by 34 meV (PySCFEngine.translation_error); and an 11 Å
    # cutoff needs a 6x6x6 mesh (aliased_hoppings). Consistent, but expensive: not trained.
    "na": (rattled_bcc_na, {"basis": "gth-szv", "xc": "PBE", "pseudo": "gth-pbe",
                            "kmesh": (6, 6, 6), "ke_cutoff": 150.0}, 0.01,
           {"cutoff": 11.0, "avg_neighbors": 50.0}),
    # graphene: 60 Ha keeps the engine translation-invariant to ~1 meV (20 Ha: 2.3 eV); the
    # 6x6 mesh's 14.8 Å supercell exceeds twice the 7 Å cutoff (a 3x3 mesh aliases hoppings)
    "graphene": (rattled_graphene, {"basis": "gth-szv", "xc": "PBE", "pseudo": "gth-pbe",
                                    "kmesh": (6, 6, 1), "ke_cutoff": 60.0}, 0.01,
                 {"cutoff": 7.0, "avg_neighbors": 50.0}),
}


class DeepHZeroLoss:
    """loss_fn(model, batch_of_indices) -> (loss, metrics) for the core Trainer.

    mode "unsupervised": mean over the batch of A[H_theta] + C[H_theta] (Ha; labels unused
    except for the reported metric dH_meV when ``labels`` are given);
    mode "supervised": mean squared error to the SCF Hamiltonians (Ha^2).
    """

    def __init__(self, structures: list[Atoms], engine_kwargs: dict, sigma: float,
                 mode: str = "unsupervised", sc_weight: float = 1.0,
                 labels: list[dict] | None = None, refresh_every: int = 1,
                 anderson: int = 0):
        if mode not in ("unsupervised", "supervised"):
            raise ValueError("mode must be 'unsupervised' or 'supervised'")
        if mode == "supervised" and labels is None:
            raise ValueError("supervised training needs SCF labels")
        self.structures = structures
        self.engine_kwargs = engine_kwargs
        self.sigma = sigma
        self.mode = mode
        self.sc_weight = sc_weight
        self.labels = labels
        self.refresh_every = max(1, int(refresh_every))
        self.anderson = anderson
        self._objectives: dict[int, FreeEnergy] = {}
        self._visits: dict[int, int] = {}
        self._frozen: dict[int, tuple] = {}
        self._mixers: dict[int, Anderson] = {}
        self.engine_calls = 0

    def _unsupervised_terms(self, i: int, h: torch.Tensor):
        """Fresh objective every ``refresh_every`` visits of structure i, frozen F between."""
        obj = self.objective(i)
        visit = self._visits.get(i, 0)
        self._visits[i] = visit + 1
        if visit % self.refresh_every == 0 or i not in self._frozen:
            terms = obj.evaluate(h)
            self.engine_calls += 1
            fock = terms.fock
            if self.anderson:
                mixer = self._mixers.setdefault(i, Anderson(self.anderson))
                fock = mixer.update(h.detach().numpy(), terms.fock)
            self._frozen[i] = (fock, terms.energy, terms.density.dm.detach().numpy())
            if fock is terms.fock:
                return terms
        return obj.evaluate_frozen(h, *self._frozen[i])

    def objective(self, idx: int) -> FreeEnergy:
        if idx not in self._objectives:
            eng = PySCFEngine(self.structures[idx], **self.engine_kwargs)
            self._objectives[idx] = FreeEnergy(eng, sigma=self.sigma, sc_weight=self.sc_weight,
                                               sc_gradient="detached")
        return self._objectives[idx]

    def kpts(self, idx: int) -> np.ndarray | None:
        if not any(self.structures[idx].pbc):
            return None
        return self.objective(idx).engine.kpts

    def __call__(self, model: torch.nn.Module, batch: list[int]):
        net = model.module if hasattr(model, "module") else model
        atoms = [self.structures[i] for i in batch]
        g = build_graph(atoms, net.cutoff, net.species)
        kpts = [self.kpts(i) for i in batch]
        # through model(...) so that DDP (torchrun) sees the forward and averages gradients
        onsite, hops = model(g)
        hs = assemble_k(net.basis, g, onsite, hops, kpts)
        total = torch.zeros((), dtype=torch.float64)
        metrics = {"free_energy_Ha": 0.0, "sc_meV": 0.0}
        if self.labels is not None:
            metrics["dH_meV"] = 0.0
        for i, h in zip(batch, hs):
            if self.mode == "unsupervised":
                terms = self._unsupervised_terms(i, h)
                total = total + terms.loss
                metrics["free_energy_Ha"] += float(terms.free_energy.detach())
                metrics["sc_meV"] += float(np.mean(np.abs(h.detach().numpy() - terms.fock))) \
                    * HARTREE * 1e3
            else:
                ref = torch.as_tensor(self.labels[i]["fock"]).to(h.dtype)
                total = total + (h - ref).abs().pow(2).mean()
            if self.labels is not None:
                metrics["dH_meV"] += float(np.mean(np.abs(
                    h.detach().numpy() - self.labels[i]["fock"]))) * HARTREE * 1e3
        n = len(batch)
        return total / n, {k: v / n for k, v in metrics.items()}


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make_model(system: str, structures: list[Atoms], n_guess: int = 10,
               max_truncation: float = 1e-2, max_translation_ev: float = 0.05,
               **overrides) -> DeepHE3:
    """A fresh network for ``system`` with the engine's basis; output biases and scales set
    from the atomic-density guess F[D_atoms] of the first ``n_guess`` structures (label-free,
    one Kohn-Sham build each; periodic systems use one structure, on-site biases only).

    Raises ValueError (periodic cells) when the graph cutoff misses more than
    ``max_truncation`` of the basis overlap S(k), when translating the cell changes the
    engine's on-site levels by more than ``max_translation_ev`` (FFT grid too coarse) -- no
    equivariant network can represent such an H(k) -- or when the k-mesh cannot tell two
    hoppings of the training graphs apart (``aliased_hoppings``): the label-free loss sees
    H(k) only on the mesh, so the bands between mesh points would be unconstrained.
    """
    gen, eng_kw, sigma, model_kw = SYSTEMS[system]
    eng = PySCFEngine(structures[0], **eng_kw)
    desc = eng.describe()
    model = DeepHE3(eng.orbital_basis.to_dict(), engine=desc, sigma=sigma,
                    **{**model_kw, **overrides})
    if desc.get("periodic"):
        aliased = aliased_hoppings(build_graph(structures, model.cutoff, model.species),
                                   eng.kmesh)
        if aliased:
            raise ValueError(
                f"k-mesh {eng.kmesh} is too coarse for the {model.cutoff} Å cutoff: {aliased} "
                "hoppings H_ij(R) share their Bloch phases on the mesh with another edge "
                "(R + N.a), so training on the mesh leaves them undetermined; use a "
                "k-mesh whose supercell exceeds twice the cutoff")
    missing = eng.overlap_truncation(model.cutoff)
    if missing > max_truncation:
        raise ValueError(
            f"cutoff {model.cutoff} Å misses basis overlaps up to {missing:.3g} (tolerance "
            f"{max_truncation}): the {desc['basis']} functions reach further; raise the cutoff")
    drift = eng.translation_error() * HARTREE
    if drift > max_translation_ev:
        raise ValueError(
            f"translating the cell changes the engine's on-site levels by {drift:.3g} eV "
            f"(tolerance {max_translation_ev}): ke_cutoff {desc.get('ke_cutoff')} Ha is too "
            "coarse for this pseudopotential and basis; raise ke_cutoff")
    guess_set = structures[:1] if desc.get("periodic") else structures[:n_guess]
    guesses = [initial_hamiltonian(eng if k == 0 else PySCFEngine(atoms, **eng_kw), "atom")
               for k, atoms in enumerate(guess_set)]
    model.initialize_from_guess(build_graph(guess_set, model.cutoff, model.species), guesses)
    return model


def train(system: str, mode: str, workdir: str | Path, *, n_train: int = 60, seed: int = 0,
          epochs: int = 300, lr: float = 3e-3, batch_size: int = 10, sc_weight: float = 1.0,
          model: DeepHE3 | None = None, with_labels: bool = False, progress: bool = True,
          patience: int = 40, model_kwargs: dict | None = None, refresh_every: int = 1,
          anderson: int = 0, lr_patience: int = 10, set_lr: float | None = None,
          schedule: str = "plateau", min_lr: float = 1e-5) -> tuple[DeepHE3, list[dict]]:
    """Train on ``n_train`` generated structures of ``system``; returns (model, history).

    ``set_lr`` overrides the learning rate restored from ``workdir/last.pt`` (a resumed run
    otherwise keeps the optimizer's saved rate); the rate is halved after ``lr_patience``
    epochs without a lower loss (``schedule="plateau"``), or follows a cosine from ``lr`` to
    ``min_lr`` over ``epochs`` with the final model kept (``"cosine"``; suits the refreshed
    unsupervised targets, whose loss values are not comparable between refreshes).
    """
    gen, eng_kw, sigma, _ = SYSTEMS[system]
    structures = gen(n_train, seed=seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    labels = None
    if mode == "supervised" or with_labels:
        labels = _shared_references(structures, eng_kw, sigma, workdir / "train_scf.h5",
                                    progress=progress)
    if model is None:
        # seeded: the command reproduces the model, and every torchrun rank starts alike
        torch.manual_seed(seed)
        model = make_model(system, structures, **(model_kwargs or {}))
    loss = DeepHZeroLoss(structures, eng_kw, sigma, mode=mode, sc_weight=sc_weight,
                         labels=labels, refresh_every=refresh_every, anderson=anderson)
    data_hash = hash_arrays(*[a.positions for a in structures])
    trainer = Trainer(model, loss, _Indices(len(structures)), None, batch_size=batch_size,
                      lr=lr, max_epochs=epochs, patience=patience, lr_patience=lr_patience,
                      lr_factor=0.5, min_lr=min_lr, workdir=workdir, seed=seed,
                      schedule=schedule,
                      # heads of element pairs absent from a batch (O-O in water) get no
                      # gradient; DDP must be told, or it waits for them forever
                      find_unused_parameters=True,
                      progress=progress, data_hash=data_hash,
                      checkpoint_extra={"system": system, "mode": mode, "n_train": n_train,
                                        "seed": seed, "sigma": sigma, "sc_weight": sc_weight,
                                        "refresh_every": refresh_every, "anderson": anderson,
                                        "schedule": schedule})
    _absolute_plateau(trainer.scheduler)
    if set_lr is not None:
        for group in trainer.optimizer.param_groups:
            group["lr"] = set_lr
    history = trainer.fit()
    return trainer.model, history


def _shared_references(structures: list[Atoms], eng_kw: dict, sigma: float, path: Path,
                       progress: bool) -> list[dict]:
    """SCF references cached at ``path``: under torchrun rank 0 computes and writes them,
    the other ranks wait and read (concurrent writers would corrupt the HDF5 file)."""
    rank, world = distributed_context()
    if rank == 0:
        refs = scf_references(structures, eng_kw, sigma, path, progress=progress)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        refs = scf_references(structures, eng_kw, sigma, path, progress=False)
    return refs


def _absolute_plateau(scheduler, threshold_ha: float = 1e-6) -> None:
    """Make ReduceLROnPlateau compare losses in absolute terms.

    The unsupervised loss is a negative total energy (~ -76 Ha for water); PyTorch's default
    relative test ``loss < best * (1 - 1e-4)`` then accepts any loss up to 7.6 mHa *worse*
    than the best as an improvement, so the rate never decays (measured: 60 epochs at the
    initial rate). Set after the Trainer has restored a resumed scheduler state.
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.threshold_mode = "abs"
        scheduler.threshold = threshold_ha


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a DeepH-Zero network (see docs/deephzero.md)")
    p.add_argument("--system", choices=sorted(SYSTEMS), default="h2o")
    p.add_argument("--mode", choices=["unsupervised", "supervised", "finetune"],
                   default="unsupervised")
    p.add_argument("--workdir", default="runs/deephzero")
    p.add_argument("--out", default=None, help="write the final model here (.pt)")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--pretrain-epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--sc-weight", type=float, default=1.0)
    p.add_argument("--with-labels", action="store_true",
                   help="also compute SCF labels to report dH (not used by the loss)")
    p.add_argument("--refresh-every", type=int, default=1,
                   help="call the DFT engine for a structure every k epochs; F frozen between")
    p.add_argument("--anderson", type=int, default=0,
                   help="Anderson/DIIS history of the refreshed Kohn-Sham targets (0 = off)")
    p.add_argument("--patience", type=int, default=40,
                   help="stop after this many epochs without a lower loss")
    p.add_argument("--lr-patience", type=int, default=10,
                   help="halve the learning rate after this many epochs without a lower loss")
    p.add_argument("--set-lr", type=float, default=None,
                   help="override the learning rate of a resumed run (workdir/last.pt)")
    p.add_argument("--schedule", choices=["plateau", "cosine"], default="plateau",
                   help="LR schedule: halve on plateau (keep best) or cosine to --min-lr "
                        "over --epochs (keep final)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--init-model", default=None,
                   help="start from this model (path or shipped name) instead of a new one")
    p.add_argument("--hidden", default=None, help="hidden irreps of a new network")
    p.add_argument("--layers", type=int, default=None, help="message-passing layers")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_kwargs = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers))
                    if v is not None}
    common = {"n_train": args.n_train, "seed": args.seed, "lr": args.lr,
              "batch_size": args.batch_size, "sc_weight": args.sc_weight,
              "patience": args.patience, "lr_patience": args.lr_patience,
              "schedule": args.schedule, "min_lr": args.min_lr}
    unsup = {"refresh_every": args.refresh_every, "anderson": args.anderson,
             "set_lr": args.set_lr}
    if args.mode == "finetune":
        model, _ = train(args.system, "supervised", Path(args.workdir) / "pretrain",
                         epochs=args.pretrain_epochs, model_kwargs=model_kwargs, **common)
        model, hist = train(args.system, "unsupervised", Path(args.workdir) / "finetune",
                            epochs=args.epochs, model=model, with_labels=args.with_labels,
                            **common, **unsup)
    else:
        init = DeepHE3.load(args.init_model) if args.init_model else None
        model, hist = train(args.system, args.mode, args.workdir, epochs=args.epochs,
                            with_labels=args.with_labels, model_kwargs=model_kwargs,
                            model=init, **common,
                            **(unsup if args.mode == "unsupervised" else {}))
    if args.out:
        model.save(args.out, extra={"system": args.system, "mode": args.mode,
                                    "init_model": args.init_model,
                                    "n_train": args.n_train, "seed": args.seed,
                                    "epochs": len(hist), "final": hist[-1] if hist else None})
        print(json.dumps({"saved": args.out, "final": hist[-1] if hist else None}))


if __name__ == "__main__":
    main()
