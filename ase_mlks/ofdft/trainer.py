"""Training of the density VAE and the DL functional on a generated testbed dataset.

Both use the shared ``core.training.Trainer`` (resume from ``workdir/last.pt``, early stop,
LR schedule, tqdm, DDP).  Exact symmetries of each testbed augment the training batches:
periodic grid translations and the cube's axis permutations / reflections in 3D, the
mirror x -> L - x for the hard-wall box; a transformed ground state is the exact ground state
of the transformed potential, with the same F.

Command line (reproduces the shipped models, see docs/ofdft.md)::

    python -m ase_mlks.ofdft.trainer gauss3d --n-train 5000 --workdir runs/ofdft
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..core.checkpoint import hash_arrays
from ..core.training import Trainer
from .data import Testbed, generate_dataset, get_testbed, load_dataset
from .model import ARCHITECTURES, DensityVAE, FunctionalCNN, OFDFTModel


def augment(n: torch.Tensor, tb: Testbed, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """Apply one random exact symmetry of the testbed to a batch of densities (B, *shape)."""
    def rand(k: int) -> int:
        return int(torch.randint(k, (1,), generator=generator))

    dims = tuple(range(1, n.ndim))
    if tb.periodic:
        n = torch.roll(n, shifts=tuple(rand(s) for s in tb.shape), dims=dims)
    if tb.ndim == 3:
        perm = torch.randperm(3, generator=generator).tolist()
        n = n.permute(0, *(p + 1 for p in perm))
        flips = tuple(d for d in dims if rand(2))
        if flips:
            n = torch.flip(n, flips)
    elif rand(2):
        n = torch.flip(n, (1,))
    return n.contiguous()


def _stack(batch: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(x) for x in zip(*batch))


def split(n_total: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random 80/20 train/validation split of instance indices (as in the paper)."""
    perm = np.random.default_rng(seed).permutation(n_total)
    n_val = int(round(val_fraction * n_total))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _datasets(data: dict[str, np.ndarray], seed: int
              ) -> tuple[TensorDataset, TensorDataset, np.ndarray]:
    tr, va = split(len(data["energy"]), seed=seed)
    n = torch.as_tensor(data["density"], dtype=torch.float32)
    f = torch.as_tensor(data["functional"], dtype=torch.float32)
    return TensorDataset(n[tr], f[tr]), TensorDataset(n[va], f[va]), tr


def train_vae(tb: Testbed, data: dict[str, np.ndarray], workdir: str | Path, *,
              beta: float | None = None, latent_dim: int | None = None, epochs: int = 60,
              lr: float = 1e-3, batch_size: int = 100, seed: int = 0,
              progress: bool = True) -> DensityVAE:
    """Train the beta-VAE (resumable in ``workdir``); sets ``z_init`` to the mean encoding."""
    arch = dict(ARCHITECTURES[tb.name]["vae"])
    if beta is not None:
        arch["beta"] = beta
    if latent_dim is not None:
        arch["latent_dim"] = latent_dim
    torch.manual_seed(seed)
    model = DensityVAE(tb.shape, tb.dv, tb.length, tb.periodic, testbed=tb.name, **arch)
    train_set, val_set, tr = _datasets(data, seed)
    if model.linear_skip:  # start from the PCA of log n (a resumed run overwrites it)
        model.init_linear_skip(train_set.tensors[0])

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, ...]):
        n = batch[0]
        if m.training:
            n = augment(n, tb)
        rec, mu, logvar = m(n)
        core = m.module if hasattr(m, "module") else m
        diff = (rec - n).flatten(1)
        l_rec = 0.5 * (diff**2).sum(1).mean()
        l_reg = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
        l1 = diff.detach().abs().sum(1).mean() * core.dv
        return l_rec + core.beta * l_reg, {"rec": float(l_rec.detach()),
                                           "kl": float(l_reg.detach()), "n_l1": float(l1)}

    trainer = Trainer(model, loss_fn, train_set, val_set, collate_fn=_stack,
                      batch_size=batch_size, lr=lr, max_epochs=epochs, patience=max(10, epochs),
                      lr_patience=4, min_lr=1e-5, workdir=Path(workdir), seed=seed,
                      progress=progress, data_hash=hash_arrays(data["density"][tr]),
                      checkpoint_extra={"part": "vae", "testbed": tb.name})
    trainer.fit()
    model = trainer.model.eval()
    set_latent_statistics(model, data["density"][tr])
    return model


def train_functional(tb: Testbed, data: dict[str, np.ndarray], workdir: str | Path, *,
                     epochs: int = 60, lr: float = 1e-3, batch_size: int = 100, seed: int = 0,
                     progress: bool = True) -> FunctionalCNN:
    """Train the CNN functional F[n] = e_gs - int V n by mean squared error (resumable)."""
    _, _, tr = _datasets(data, seed)
    f_tr = data["functional"][tr]
    arch = dict(ARCHITECTURES[tb.name]["functional"])
    if arch.pop("standardize_input", False):
        scaled = data["density"][tr] * tb.dv * np.prod(tb.shape)
        arch.update(n_mean=float(scaled.mean()), n_std=float(scaled.std()))
    if arch.pop("gradient_features", False):
        probe = FunctionalCNN(tb.shape, tb.dv, tb.periodic, **{**arch, "gradient_scale": 1.0})
        with torch.no_grad():
            x = probe.coarse(torch.as_tensor(data["density"][tr[:500]] * tb.dv
                                             * np.prod(tb.shape)).unsqueeze(1))
            arch["gradient_scale"] = float(probe._gradient_feature(x).mean())
    torch.manual_seed(seed)
    model = FunctionalCNN(tb.shape, tb.dv, tb.periodic, f_mean=float(f_tr.mean()),
                          f_std=float(f_tr.std()), testbed=tb.name, **arch)
    train_set, val_set, _ = _datasets(data, seed)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, ...]):
        n, f = batch
        if m.training:
            n = augment(n, tb)
        core = m.module if hasattr(m, "module") else m
        pred = m(n)
        loss = (((pred - f) / core.f_std) ** 2).mean()
        return loss, {"mae_E0": float((pred - f).detach().abs().mean())}

    trainer = Trainer(model, loss_fn, train_set, val_set, collate_fn=_stack,
                      batch_size=batch_size, lr=lr, max_epochs=epochs, patience=max(10, epochs),
                      lr_patience=4, min_lr=1e-5, workdir=Path(workdir), seed=seed,
                      progress=progress, data_hash=hash_arrays(data["density"][tr]),
                      checkpoint_extra={"part": "functional", "testbed": tb.name})
    trainer.fit()
    return trainer.model.eval()


def train_testbed(name: str, workdir: str | Path, *, n_train: int, seed: int = 0,
                  vae_epochs: int = 60, functional_epochs: int = 60, lr: float = 1e-3,
                  vae_lr: float | None = None, beta: float | None = None,
                  latent_dim: int | None = None,
                  output: str | Path | None = None, workers: int = 1, batch_size: int = 100,
                  progress: bool = True) -> OFDFTModel:
    """Generate (or reuse) the dataset, train both networks, write the combined checkpoint."""
    tb = get_testbed(name)
    root = Path(workdir)
    data_dir = generate_dataset(name, root / "data" / name / "train", n_train, seed=seed,
                                workers=workers, progress=progress)
    data = load_dataset(data_dir, limit=n_train)
    tag = f"beta{beta:g}" if beta is not None else "default"
    if latent_dim is not None:
        tag += f"-ld{latent_dim}"
    vae = train_vae(tb, data, root / "train" / name / f"vae-{tag}", beta=beta,
                    latent_dim=latent_dim, epochs=vae_epochs, lr=vae_lr or lr, seed=seed,
                    batch_size=batch_size, progress=progress)
    func = train_functional(tb, data, root / "train" / name / "functional",
                            epochs=functional_epochs, lr=lr, seed=seed,
                            batch_size=batch_size, progress=progress)
    model = OFDFTModel.from_parts(vae, func)
    out = Path(output) if output else root / f"ofdft-{name}-{tag}.pt"
    model.save(out, data_hash=hash_arrays(data["density"]),
               units={"energy": "E0 (Hartree)", "length": "a0 (Bohr)"},
               extra={"n_train": n_train, "seed": seed, "vae_epochs": vae_epochs,
                      "functional_epochs": functional_epochs, "lr": lr,
                      "vae_lr": vae_lr or lr,
                      "batch_size": batch_size})
    return model


def set_latent_statistics(vae: DensityVAE, densities: np.ndarray, batch: int = 200) -> None:
    """Store the mean and spread of the training encodings (start and units of the descent)."""
    vae.eval()
    with torch.no_grad():
        mu = torch.cat([vae.encode(torch.as_tensor(densities[i:i + batch],
                                                   dtype=torch.float32))[0]
                        for i in range(0, len(densities), batch)])
    vae.z_init.copy_(mu.mean(0))
    vae.z_std.copy_(mu.std(0))


def assemble(name: str, workdir: str | Path, output: str | Path, *, n_train: int,
             seed: int = 0, tag: str = "default") -> OFDFTModel:
    """Combine the best checkpoints of the two trainings so far (a run stopped early too)."""
    get_testbed(name)  # a clear error for an unknown name
    root = Path(workdir)
    data = load_dataset(root / "data" / name / "train", limit=n_train)
    vae = DensityVAE.load(root / "train" / name / f"vae-{tag}" / "best.pt")
    func = FunctionalCNN.load(root / "train" / name / "functional" / "best.pt")
    _, _, tr = _datasets(data, seed)
    set_latent_statistics(vae, data["density"][tr])
    model = OFDFTModel.from_parts(vae, func)
    epochs = {part: getattr(m, "checkpoint_meta", {}).get("extra", {}).get("epoch")
              for part, m in (("vae", vae), ("functional", func))}
    model.save(output, data_hash=hash_arrays(data["density"]),
               units={"energy": "E0 (Hartree)", "length": "a0 (Bohr)"},
               extra={"n_train": n_train, "seed": seed, "best_epochs": epochs})
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("testbed", choices=["gauss1d", "speckle1d", "gauss3d"])
    p.add_argument("--n-train", type=int, default=5000, help="instances (80/20 train/val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-epochs", type=int, default=60)
    p.add_argument("--functional-epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-lr", type=float, default=None, help="VAE learning rate (default --lr)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--latent-dim", type=int, default=None)
    p.add_argument("--workdir", default="runs/ofdft")
    p.add_argument("--output", default=None, help="combined checkpoint (.pt)")
    p.add_argument("--workers", type=int, default=1, help="processes for data generation")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--assemble", action="store_true",
                   help="only combine the best checkpoints so far into --output")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.assemble:
        out = args.output or Path(args.workdir) / f"ofdft-{args.testbed}.pt"
        assemble(args.testbed, args.workdir, out, n_train=args.n_train, seed=args.seed)
        print(f"wrote {out}")
        return
    model = train_testbed(args.testbed, args.workdir, n_train=args.n_train, seed=args.seed,
                          vae_epochs=args.vae_epochs, functional_epochs=args.functional_epochs,
                          lr=args.lr, vae_lr=args.vae_lr, beta=args.beta,
                          latent_dim=args.latent_dim,
                          output=args.output, workers=args.workers,
                          batch_size=args.batch_size)
    print(json.dumps({"testbed": args.testbed,
                      "parameters": sum(q.numel() for q in model.parameters())}))


if __name__ == "__main__":
    main()
