"""The training loop every trainer shares: epochs, validation, early stopping, LR schedule,
checkpoint/resume, tqdm progress, JSON-lines metrics, and DDP under ``torchrun``.

A model-specific trainer supplies only ``loss_fn(model, batch) -> (loss, metrics)``. Inside
it, call the model through ``model(...)`` (its ``forward``): under DDP that call is what
lets gradients be averaged across processes.

``batch_size`` is the *global* batch: with N processes each takes ``batch_size // N`` items
of the same shuffled order (``DistributedSampler`` is used for one process too), so a run on
N processes takes the same optimization steps as a run on one.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .errors import CheckpointError
from .io import atomic_path

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


def distributed_context() -> tuple[int, int]:
    """(rank, world_size); initializes the gloo process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=os.environ.get("ASE_MLKS_DIST_BACKEND", "gloo"))
        # The group lives as long as the process (a trainer may run several stages), but it
        # must be torn down before interpreter exit: left to static destructors, gloo's
        # threads sometimes abort a rank ("terminate called without an active exception").
        atexit.register(_destroy_group)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _destroy_group() -> None:
    # no barrier: a rank that exits on an error must not wait for the others at exit
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - user code may use the global RNG
    torch.manual_seed(seed)


def _make_optimizer(kind: str | Callable, params: Iterable, lr: float, weight_decay: float):
    if callable(kind):
        return kind(params)
    if kind == "lbfgs":
        # One outer step = up to 20 function evaluations with a strong-Wolfe line search;
        # ``lr`` only scales the first trial step. Meant for full-batch training of small
        # data sets, where it converges far better than Adam (measured on DPWannier stage 1).
        if weight_decay:
            raise ValueError("lbfgs does not support weight_decay")
        return torch.optim.LBFGS(params, lr=lr, max_iter=20, history_size=50,
                                 line_search_fn="strong_wolfe")
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if kind not in kinds:
        raise ValueError(f"unknown optimizer {kind!r}; use one of {sorted(kinds) + ['lbfgs']} "
                         "or a factory")
    return kinds[kind](params, lr=lr, weight_decay=weight_decay)


class Trainer:
    """Generic supervised/unsupervised training loop (see module docstring)."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, train_set: Dataset,
                 val_set: Dataset | None = None, *, collate_fn: Callable | None = None,
                 batch_size: int = 8, optimizer: str | Callable = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, max_epochs: int = 100, patience: int = 20,
                 lr_factor: float = 0.5, lr_patience: int = 5, min_lr: float = 1e-6,
                 workdir: str | os.PathLike = "runs/train", seed: int = 0, resume: bool = True,
                 grad_clip: float | None = None, progress: bool = True, shuffle: bool = True,
                 parameters: Iterable[torch.nn.Parameter] | None = None,
                 checkpoint_extra: dict | None = None, data_hash: str | None = None,
                 find_unused_parameters: bool = False, schedule: str = "plateau"):
        self.rank, self.world = distributed_context()
        if batch_size % self.world:
            raise ValueError(
                f"global batch {batch_size} is not divisible by {self.world} processes")
        seed_everything(seed)
        self.model = model
        self.loss_fn = loss_fn
        self.train_set, self.val_set = train_set, val_set
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.max_epochs, self.patience = max_epochs, patience
        self.workdir = Path(workdir)
        self.grad_clip = grad_clip
        self.progress = progress and self.rank == 0
        self.seed, self.shuffle = seed, shuffle
        self.checkpoint_extra = checkpoint_extra or {}
        self.data_hash = data_hash
        params = [p for p in (parameters if parameters is not None else model.parameters())
                  if p.requires_grad]
        self.params = params
        if optimizer == "lbfgs" and grad_clip:
            # L-BFGS's line search needs the true gradient; a clipped one breaks its curvature
            # pairs, and silently ignoring the option would hide that it had no effect
            raise ValueError("lbfgs does not support grad_clip")
        self.optimizer = _make_optimizer(optimizer, params, lr, weight_decay)
        if schedule not in ("plateau", "cosine"):
            raise ValueError(f"schedule must be 'plateau' or 'cosine', got {schedule!r}")
        self.schedule = schedule
        if schedule == "cosine":
            # A fixed budget: the rate follows half a cosine from lr to min_lr over
            # max_epochs, no early stop, and the final model (the schedule's end point) is
            # kept -- for losses whose value is not comparable across epochs (a target that
            # is refreshed during training), where "best by loss" means nothing.
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max_epochs, eta_min=min_lr)
        else:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=lr_factor, patience=lr_patience, min_lr=min_lr)
        self.min_lr = min_lr
        self.ddp_model: torch.nn.Module = model
        if self.world > 1:
            self.ddp_model = DistributedDataParallel(
                model, find_unused_parameters=find_unused_parameters)
        self.epoch = 0
        self.best_val = math.inf
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self._best_state: dict[str, torch.Tensor] | None = None
        if resume and (self.workdir / "last.pt").exists():
            self._load_state(self.workdir / "last.pt")

    # -- data -------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = DistributedSampler(dataset, num_replicas=self.world if train else 1,
                                     rank=self.rank if train else 0,
                                     shuffle=self.shuffle and train, seed=self.seed)
        sampler.set_epoch(self.epoch)
        per_rank = self.batch_size // self.world if train else self.batch_size
        return DataLoader(dataset, batch_size=per_rank, sampler=sampler,
                          collate_fn=self.collate_fn or (lambda b: b))

    # -- one epoch ----------------------------------------------------------------------
    def _run_epoch(self, dataset: Dataset, train: bool) -> dict[str, float]:
        self.model.train(train)
        loader = self._loader(dataset, train)
        sums: dict[str, float] = {}
        count = 0
        desc = f"epoch {self.epoch + 1}/{self.max_epochs} {'train' if train else 'val'}"
        for batch in tqdm(loader, desc=desc, disable=not self.progress, leave=False):
            if train and isinstance(self.optimizer, torch.optim.LBFGS):
                loss, metrics = self._lbfgs_step(batch)
            else:
                if train:
                    self.optimizer.zero_grad(set_to_none=True)
                loss, metrics = self.loss_fn(self.ddp_model if train else self.model, batch)
                if train:
                    loss.backward()
                    if self.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                    self.optimizer.step()
            metrics = {"loss": float(loss.detach()), **metrics}
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
        means = {k: v / max(count, 1) for k, v in sums.items()}
        if train and self.world > 1:  # report the mean over processes
            t = torch.tensor([means[k] for k in sorted(means)], dtype=torch.float64)
            dist.all_reduce(t)
            means = dict(zip(sorted(means), (t / self.world).tolist()))
        return means

    def _lbfgs_step(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """One L-BFGS step (several closure evaluations) on ``batch``.

        Under DDP every process must take the same line-search decisions, so the closure
        returns the loss averaged over processes (the gradients already are, by DDP).
        Returns the loss and metrics of the first evaluation (at the step's start point).
        """
        first: list = []

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self.loss_fn(self.ddp_model, batch)
            loss.backward()
            value = loss.detach().clone()
            if self.world > 1:
                dist.all_reduce(value)
                value /= self.world
            if not first:
                first.extend([value, metrics])
            return value

        self.optimizer.step(closure)
        return first[0], first[1]

    def fit(self) -> list[dict[str, float]]:
        """Train until ``max_epochs``, early stopping, or the minimum learning rate."""
        epochs = tqdm(range(self.epoch, self.max_epochs), desc="training",
                      disable=not self.progress, initial=self.epoch, total=self.max_epochs)
        for _ in epochs:
            train_metrics = self._run_epoch(self.train_set, train=True)
            val_metrics = self._run_epoch(self.val_set, train=False) if self.val_set else {}
            self.epoch += 1
            monitor = val_metrics.get("loss", train_metrics["loss"])
            if self.schedule == "cosine":
                self.scheduler.step()
            else:
                self.scheduler.step(monitor)
            record = {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
                      **{f"train_{k}": v for k, v in train_metrics.items()},
                      **{f"val_{k}": v for k, v in val_metrics.items()}}
            self.history.append(record)
            improved = monitor < self.best_val
            if improved:
                self.best_val, self.bad_epochs = monitor, 0
                self._best_state = {k: v.detach().clone()
                                    for k, v in self.model.state_dict().items()}
            else:
                self.bad_epochs += 1
            epochs.set_postfix(loss=f"{train_metrics['loss']:.3g}",
                               val=f"{val_metrics.get('loss', float('nan')):.3g}")
            if self.rank == 0:
                self._log(record)
                if improved:
                    save_checkpoint(self.workdir / "best.pt", self.model, data_hash=self.data_hash,
                                    extra={**self.checkpoint_extra, "epoch": self.epoch,
                                           "best_val": self.best_val})
                self._save_state(self.workdir / "last.pt")
            if self.schedule == "cosine":
                continue
            if self.bad_epochs >= self.patience:
                break
            if self.optimizer.param_groups[0]["lr"] <= self.min_lr * (1 + 1e-9) \
                    and self.bad_epochs >= self.scheduler.patience:
                break
        if self._best_state is not None and self.schedule != "cosine":
            self.model.load_state_dict(self._best_state)
        return self.history

    # -- persistence --------------------------------------------------------------------
    def _log(self, record: dict[str, float]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save_state(self, path: Path) -> None:
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
            "best_val": self.best_val, "bad_epochs": self.bad_epochs, "history": self.history,
            "best_state": self._best_state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
                    "python": random.getstate()},
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def _load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except Exception as err:
            raise CheckpointError(
                f"cannot resume from {path} ({err}); delete it to start afresh") from err
        self.epoch, self.best_val = state["epoch"], state["best_val"]
        self.bad_epochs, self.history = state["bad_epochs"], state["history"]
        self._best_state = state.get("best_state")
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])  # noqa: NPY002
        random.setstate(state["rng"]["python"])
