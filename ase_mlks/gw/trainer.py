"""Trainers of the GW post-processor, on the shared :class:`ase_mlks.core.training.Trainer`.

1. ``train_vae``: unsupervised crystal VAE (MSE + beta*KL) of one field kind: ``"state"``
   (single KS states), ``"super"`` (pseudobands super states) or ``"density"``.
2. ``train_head``: supervised GW head on frozen encoders, target Sigma = eps_GW - eps_DFT.

Both resume from ``workdir/last.pt`` and show tqdm progress. Command line::

    python -m ase_mlks.gw.trainer vae --kind state --data data/raw/gw_ks_dev.h5 \
        --workdir runs/gw/state
    python -m ase_mlks.gw.trainer assemble --out ase_mlks/pretrained/gw-c2d-pbe.pt ...
    python -m ase_mlks.gw.trainer head --model ... --gw data/gw_monolayers.h5 ...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ase_mlks.core.checkpoint import hash_file, load_checkpoint
from ase_mlks.core.training import Trainer

from .data import HELD_OUT, MaterialStates, list_materials, read_material
from .model import CrystalVAE, GWModel, vae_loss

KINDS = ("state", "super", "density")


def scale_fields(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each field (..., nz, n1, n2) by its maximum -> values in [0, 1], and the maxima.

    The maximum is invariant to origin, lattice-vector choice and tiling, so is the scaled
    field's latent vector; the amplitude is kept separately (norm preservation is checked on
    the rescaled reconstruction).
    """
    m = x.reshape(*x.shape[:-3], -1).max(axis=-1)
    m = np.maximum(m, 1e-12)
    return (x / m[..., None, None, None]).astype(np.float32), m


def fields_of(ms: MaterialStates, kind: str) -> np.ndarray:
    """Raw fields (N, nz, n1, n2) of one material for a VAE kind."""
    if kind == "state":
        return ms.moduli.reshape(-1, *ms.moduli.shape[-3:])
    if kind == "super":
        keep = ms.super_counts > 0
        return ms.super_moduli[keep]
    if kind == "density":
        return ms.density[None]
    raise ValueError(f"unknown VAE kind {kind!r}; use one of {KINDS}")


class FieldDataset(Dataset):
    """Scaled fields of several materials; item = (material index, field (nz, n1, n2))."""

    def __init__(self, fields: list[np.ndarray], materials: list[int]):
        self.fields = [torch.from_numpy(f) for f in fields]
        self.materials = materials

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, i: int):
        return self.materials[i], self.fields[i]


def group_by_shape(batch) -> list[torch.Tensor]:
    """Collate: stack fields of equal grid shape (materials differ in their in-plane grid)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, x in batch:
        groups.setdefault(tuple(x.shape), []).append(x)
    return [torch.stack(v) for v in groups.values()]


def load_fields(paths: Sequence[str | Path], kind: str, exclude: Sequence[str] = HELD_OUT,
                only: Sequence[str] | None = None) -> tuple[list[np.ndarray], list[int], list[str]]:
    """All scaled fields of ``kind`` from KS HDF5 files (material groups), minus ``exclude``."""
    fields, mats, names = [], [], []
    for path in paths:
        for name in list_materials(path):
            if name in exclude or (only is not None and name not in only):
                continue
            ms = read_material(path, name)
            x, _ = scale_fields(fields_of(ms, kind))
            names.append(name)
            fields += list(x)
            mats += [len(names) - 1] * len(x)
    if not fields:
        raise ValueError(f"no {kind} fields found in {list(map(str, paths))}")
    return fields, mats, names


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random split of n items (the paper's 90/10)."""
    perm = np.random.default_rng(seed).permutation(n)
    nval = max(1, int(round(val_fraction * n))) if n > 1 else 0
    return np.sort(perm[nval:]), np.sort(perm[:nval])


def make_vae_loss(beta: float):
    def loss_fn(model: torch.nn.Module, batch: list[torch.Tensor]):
        total, mse_sum, kl_sum, n = 0.0, 0.0, 0.0, 0
        for x in batch:
            loss, mse, kl = vae_loss(model(x), beta)
            total = total + loss * len(x)
            mse_sum += float(mse.detach()) * len(x)
            kl_sum += float(kl.detach()) * len(x)
            n += len(x)
        return total / n, {"mse": mse_sum / n, "kl": kl_sum / n}
    return loss_fn


def train_vae(data: Sequence[str | Path], kind: str = "state", workdir: str | Path = "runs/gw/vae",
              channels: int = 64, latent: int = 30, beta: float = 1e-4, epochs: int = 30,
              batch_size: int = 32, lr: float = 1e-3, val_fraction: float = 0.1, seed: int = 0,
              exclude: Sequence[str] = HELD_OUT, progress: bool = True,
              max_fields: int | None = None, patience: int = 10) -> tuple[CrystalVAE, dict]:
    """Train a crystal VAE on ``kind`` fields; returns (model with best weights, split info)."""
    fields, mats, names = load_fields(data, kind, exclude)
    if max_fields is not None and len(fields) > max_fields:  # uniform subsample, reproducible
        keep = np.sort(np.random.default_rng(seed).choice(len(fields), max_fields, replace=False))
        fields, mats = [fields[i] for i in keep], [mats[i] for i in keep]
    tr, va = split_indices(len(fields), val_fraction, seed)
    train_set = FieldDataset([fields[i] for i in tr], [mats[i] for i in tr])
    val_set = FieldDataset([fields[i] for i in va], [mats[i] for i in va]) if len(va) else None
    model = CrystalVAE(in_channels=fields[0].shape[0], channels=channels, latent=latent)
    info = {"kind": kind, "materials": names, "n_train": len(tr), "n_val": len(va),
            "beta": beta, "seed": seed, "val_fraction": val_fraction,
            "data": [str(p) for p in data]}
    trainer = Trainer(model, make_vae_loss(beta), train_set, val_set, collate_fn=group_by_shape,
                      batch_size=batch_size, lr=lr, max_epochs=epochs, patience=patience,
                      workdir=workdir, seed=seed, progress=progress, checkpoint_extra=info,
                      data_hash=hash_file(data[0]))
    trainer.fit()
    return trainer.model, info


# --------------------------------------------------------------------------- GW head


def material_context(model: GWModel, ms: MaterialStates) -> torch.Tensor:
    """Per-material context vector of Eq. (3) (super states + density encodings)."""
    sup, _ = scale_fields(ms.super_moduli)
    rho, _ = scale_fields(ms.density[None])
    return model.context(torch.from_numpy(sup), torch.as_tensor(ms.super_energies,
                                                                 dtype=torch.float32),
                         torch.from_numpy(rho[0]))


@torch.no_grad()
def state_features(model: GWModel, ms: MaterialStates, spin: int, kpt_bands: np.ndarray,
                   energies: np.ndarray, context: torch.Tensor) -> torch.Tensor:
    """Raw head features for states given by rows (k index, position in ms.bands)."""
    x = ms.moduli[spin, kpt_bands[:, 0], kpt_bands[:, 1]]
    xs, _ = scale_fields(x)
    mu = torch.cat([model.state_vae.embed(torch.from_numpy(c))
                    for c in np.array_split(xs, max(1, len(xs) // 256))])
    return model.features(mu, torch.as_tensor(energies, dtype=torch.float32), context)


class TensorPairs(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def collate_pairs(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def head_loss(model: torch.nn.Module, batch):
    x, y = batch
    pred = model(x)
    loss = torch.nn.functional.mse_loss(pred, y)
    return loss, {"mae": float((pred - y).abs().mean())}


def train_head(model: GWModel, x_train: torch.Tensor, y_train: torch.Tensor,
               x_val: torch.Tensor | None, y_val: torch.Tensor | None,
               workdir: str | Path, epochs: int = 1000, lr: float = 1e-3, batch_size: int = 64,
               seed: int = 0, progress: bool = True, patience: int = 100) -> GWModel:
    """Fit the head (encoders frozen) to Sigma targets (eV); sets the standardization."""
    model.feature_mean.copy_(x_train.mean(0))
    model.feature_std.copy_(x_train.std(0).clamp_min(1e-6))
    model.target_mean.copy_(y_train.mean())
    model.target_std.copy_(y_train.std().clamp_min(1e-3))
    for p in list(model.state_vae.parameters()) + list(model.super_vae.parameters()) + \
            list(model.density_vae.parameters()):
        p.requires_grad_(False)
    val = TensorPairs(x_val, y_val) if x_val is not None and len(y_val) else None
    trainer = Trainer(model, head_loss, TensorPairs(x_train, y_train), val,
                      collate_fn=collate_pairs, batch_size=batch_size, lr=lr, weight_decay=1e-5,
                      max_epochs=epochs, patience=patience, lr_patience=20, workdir=workdir,
                      seed=seed, progress=progress, parameters=model.head.parameters())
    trainer.fit()
    model = trainer.model
    model.head_trained.fill_(True)
    return model


def assemble(state: str | Path, super_: str | Path, density: str | Path, **kw) -> GWModel:
    """GWModel from three trained VAE checkpoints (head untrained)."""
    parts = [load_checkpoint(p) for p in (state, super_, density)]
    model = GWModel(vae=parts[0]["hparams"], super_vae=parts[1]["hparams"],
                    density_vae=parts[2]["hparams"], **kw)
    for sub, p in zip((model.state_vae, model.super_vae, model.density_vae), parts):
        sub.load_state_dict(p["state_dict"])
    return model


@torch.no_grad()
def reconstruction_metrics(vae: CrystalVAE, fields: np.ndarray, batch: int = 64
                           ) -> dict[str, np.ndarray]:
    """Reconstruction quality of raw fields (N, nz, n1, n2) (deterministic z = mu).

    Returns per-field arrays: r2 (coefficient of determination over the grid), norm_ratio
    (sum |rec|^2 / sum |x|^2, the norm preservation), and the reconstructions (raw units).
    """
    x, scale = scale_fields(fields)
    recs = []
    for i in range(0, len(x), batch):
        recs.append(vae.reconstruct(torch.from_numpy(x[i:i + batch])).numpy())
    rec = np.concatenate(recs) * scale[:, None, None, None]
    flat_x = fields.reshape(len(fields), -1).astype(np.float64)
    flat_r = rec.reshape(len(rec), -1).astype(np.float64)
    ss_res = ((flat_x - flat_r) ** 2).sum(1)
    ss_tot = ((flat_x - flat_x.mean(1, keepdims=True)) ** 2).sum(1)
    return {"r2": 1 - ss_res / ss_tot, "norm_ratio": (flat_r**2).sum(1) / (flat_x**2).sum(1),
            "reconstruction": rec}


def pooled_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of prediction y for data x over all entries pooled."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    return float(1 - ((x - y) ** 2).sum() / ((x - x.mean()) ** 2).sum())


def main(argv: Sequence[str] | None = None) -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description="train the GW post-processor")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vae", help="unsupervised crystal VAE")
    v.add_argument("--kind", choices=KINDS, default="state")
    v.add_argument("--data", nargs="+", required=True)
    v.add_argument("--workdir", required=True)
    v.add_argument("--channels", type=int, default=64)
    v.add_argument("--latent", type=int, default=30)
    v.add_argument("--beta", type=float, default=1e-4)
    v.add_argument("--epochs", type=int, default=30)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--max-fields", type=int, default=None)
    v.add_argument("--patience", type=int, default=10)
    v.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("assemble", help="combine three VAEs into one GW model file")
    a.add_argument("--state", required=True)
    a.add_argument("--super", required=True)
    a.add_argument("--density", required=True)
    a.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "vae":
        model, info = train_vae(args.data, args.kind, args.workdir, args.channels, args.latent,
                                args.beta, args.epochs, args.batch_size, args.lr, seed=args.seed,
                                max_fields=args.max_fields, patience=args.patience)
        model.save(Path(args.workdir) / "model.pt", extra=info)
        print(json.dumps(info))
    elif args.cmd == "assemble":
        model = assemble(args.state, args.super, args.density)
        extras = {k: load_checkpoint(getattr(args, k))["extra"] for k in ("state", "super",
                                                                            "density")}
        model.save(args.out, extra={"vae_training": extras, "head": "untrained"})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
