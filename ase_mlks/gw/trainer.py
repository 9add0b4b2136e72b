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
import zlib
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
                only: Sequence[str] | None = None, scaled: bool = True
                ) -> dict[str, np.ndarray]:
    """Fields of ``kind`` per material from KS HDF5 files (material groups), minus
    ``exclude``; scaled to [0, 1] by each field's maximum unless ``scaled=False``."""
    out: dict[str, np.ndarray] = {}
    for path in paths:
        for name in list_materials(path):
            if name in exclude or (only is not None and name not in only) or name in out:
                continue
            x = fields_of(read_material(path, name), kind)
            out[name] = scale_fields(x)[0] if scaled else x
    if not out:
        raise ValueError(f"no {kind} fields found in {list(map(str, paths))}")
    return out


def material_split(name: str, n: int, val_fraction: float, seed: int,
                   max_per_material: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of one material's n fields: the paper's random 90/10 split, made
    per material with a seed derived from its name, so adding materials later leaves the
    split of the others unchanged (training can resume on a grown data set)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    perm = rng.permutation(n)
    if max_per_material is not None:
        perm = perm[:max_per_material]
    nval = int(round(val_fraction * len(perm))) if len(perm) > 1 else 0
    return np.sort(perm[nval:]), np.sort(perm[:nval])


def split_fields(fields: dict[str, np.ndarray], val_fraction: float, seed: int,
                 max_per_material: int | None = None) -> tuple[FieldDataset, FieldDataset]:
    """Train and validation sets over all materials (see :func:`material_split`)."""
    names = sorted(fields)
    tr_x, tr_m, va_x, va_m = [], [], [], []
    for i, name in enumerate(names):
        tr, va = material_split(name, len(fields[name]), val_fraction, seed, max_per_material)
        tr_x += list(fields[name][tr])
        tr_m += [i] * len(tr)
        va_x += list(fields[name][va])
        va_m += [i] * len(va)
    return FieldDataset(tr_x, tr_m), FieldDataset(va_x, va_m)


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
              batch_size: int = 16, lr: float = 2e-3, val_fraction: float = 0.1, seed: int = 0,
              exclude: Sequence[str] = HELD_OUT, progress: bool = True,
              max_per_material: int | None = None, patience: int = 10
              ) -> tuple[CrystalVAE, dict]:
    """Train a crystal VAE on ``kind`` fields; returns (model with best weights, split info)."""
    fields = load_fields(data, kind, exclude)
    train_set, val_set = split_fields(fields, val_fraction, seed, max_per_material)
    nz = next(iter(fields.values())).shape[1]
    model = CrystalVAE(in_channels=nz, channels=channels, latent=latent)
    info = {"kind": kind, "materials": sorted(fields), "n_train": len(train_set),
            "n_val": len(val_set), "beta": beta, "seed": seed, "val_fraction": val_fraction,
            "max_per_material": max_per_material, "channels": channels, "epochs": epochs,
            "lr": lr, "batch_size": batch_size, "data": [str(p) for p in data]}
    trainer = Trainer(model, make_vae_loss(beta), train_set, val_set if len(val_set) else None,
                      collate_fn=group_by_shape, batch_size=batch_size, lr=lr,
                      max_epochs=epochs, patience=patience, workdir=workdir, seed=seed,
                      progress=progress, checkpoint_extra=info, data_hash=hash_file(data[0]))
    trainer.fit()
    return trainer.model, info


# --------------------------------------------------------------------------- GW head


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
               seed: int = 0, progress: bool = True, patience: int = 100,
               weight_decay: float = 1e-5) -> GWModel:
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
                      collate_fn=collate_pairs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay,
                      max_epochs=epochs, patience=patience, lr_patience=20, workdir=workdir,
                      seed=seed, progress=progress, parameters=model.head.parameters())
    trainer.fit()
    model = trainer.model
    model.head_trained.fill_(True)
    return model


def read_gw_record(path: str | Path, name: str) -> dict:
    """One material of the reference G0W0 file (schema: ase_mlks/reference/gw.py): atoms,
    bands (n1, n2), ibz_kpts, eps / qp (nk, nb) eV, fermi_level, settings, timings."""
    import h5py
    from ase import Atoms

    with h5py.File(path, "r") as f:
        if name not in f or not f[name].attrs.get("complete", False):
            raise KeyError(f"no complete G0W0 record {name!r} in {path}")
        g = f[name]
        rec = {k: g[k][()] for k in ("bands", "ibz_kpts", "eps", "qp") if k in g}
        missing = {"bands", "ibz_kpts", "eps", "qp"} - set(rec)
        if missing:
            raise KeyError(f"G0W0 record {name!r} in {path} lacks {sorted(missing)}")
        rec["atoms"] = Atoms(numbers=g["numbers"][()], positions=g["positions"][()],
                             cell=g["cell"][()], pbc=g["pbc"][()])
        rec["fermi_level"] = float(g.attrs["fermi_level"])
        rec["settings"] = json.loads(g.attrs["settings"])
        rec["cpu_time_gs"] = float(g.attrs.get("cpu_time_gs", np.nan))
        rec["cpu_time_gw"] = float(g.attrs.get("cpu_time_gw", np.nan))
    return rec


def gw_materials(path: str | Path) -> list[str]:
    import h5py

    with h5py.File(path, "r") as f:
        return sorted(k for k in f if f[k].attrs.get("complete", False))


def gw_ground_state(rec: dict, name: str, gpw_dir: str | Path = "runs/gw_ref"):
    """GPAW calculator with the G0W0 record's KS states: the pipeline's full-diagonalization
    file ``gpw_dir/<name>_fulldiag.gpw`` if it is there, else made again by the pipeline's
    own step (:func:`ase_mlks.reference.gw.ground_state` with the record's atoms and
    settings) and checked against the record (k-points, KS energies)."""
    from gpaw import GPAW

    from ase_mlks.reference.gw import GWSettings, ground_state

    gpw = Path(gpw_dir) / f"{name}_fulldiag.gpw"
    if gpw.exists():
        calc = GPAW(str(gpw), txt=None)
    else:
        gpw.parent.mkdir(parents=True, exist_ok=True)
        calc = ground_state(rec["atoms"], GWSettings(**rec["settings"]), gpw)
    k = np.asarray(calc.get_ibz_k_points())
    if k.shape != rec["ibz_kpts"].shape or not np.allclose(k, rec["ibz_kpts"], atol=1e-6):
        raise ValueError(f"{name}: k-points of the recomputed ground state differ from the "
                         "G0W0 record's")
    n1, n2 = (int(b) for b in rec["bands"])
    eps = np.array([calc.get_eigenvalues(kpt=i)[n1:n2] for i in range(len(k))])
    dev = float(np.abs(eps - rec["eps"]).max())
    if dev > 0.05:
        raise ValueError(f"{name}: KS energies differ from the G0W0 record's by {dev:.3f} eV")
    return calc


def gw_inputs(gw_path: str | Path, name: str, gpw_dir: str | Path = "runs/gw_ref",
              cache: str | Path | None = "data/raw/gw_inputs.h5") -> MaterialStates:
    """Raw model inputs of one G0W0 material: |psi| of the G0W0 bands at the record's
    k-points, super states and density from the 6x6 context run (GPAW, minutes), cached."""
    from .calculator import context_calculator
    from .data import GridSpec, density_grid, extract_material, super_states, write_material

    if cache is not None and Path(cache).is_dir():  # one file per material (parallel runs)
        cache = Path(cache) / f"{name}.h5"
    if cache is not None and Path(cache).exists() and name in list_materials(cache):
        return read_material(cache, name)
    rec = read_gw_record(gw_path, name)
    calc = gw_ground_state(rec, name, gpw_dir)
    n1, n2 = (int(b) for b in rec["bands"])
    spec = GridSpec()
    ms = extract_material(calc, name, bands=range(n1, n2), spec=spec, with_context=False)
    ctx_calc = context_calculator(calc)
    ms.super_moduli, ms.super_energies, ms.super_counts = super_states(ctx_calc, spec)
    ms.density = density_grid(ctx_calc, spec)
    if cache is not None:
        write_material(cache, ms)
    return ms


def head_data(model: GWModel, gw_path: str | Path, names: Sequence[str],
              gpw_dir: str | Path = "runs/gw_ref",
              cache: str | Path | None = "data/raw/gw_inputs.h5", progress: bool = True
              ) -> dict[str, dict]:
    """Features, targets Sigma = qp - eps (eV) and occupations of every G0W0-labelled state,
    encoded exactly as at prediction time (calculator.encode_states / encode_context)."""
    from tqdm.auto import tqdm

    from .calculator import encode_context, encode_states

    out = {}
    for name in tqdm(names, desc="G0W0 materials", disable=not progress):
        rec = read_gw_record(gw_path, name)
        ms = gw_inputs(gw_path, name, gpw_dir, cache)
        n1, n2 = (int(b) for b in rec["bands"])
        eps = ms.eigenvalues[0][:, n1:n2]
        if np.abs(eps - rec["eps"]).max() > 0.05:
            raise ValueError(f"{name}: cached KS energies do not match the G0W0 record")
        ctx = encode_context(model, ms.super_moduli, ms.super_energies, ms.density)
        x = encode_states(model, ms.moduli[0], eps - ms.fermi_level, ctx)
        out[name] = {"x": x, "y": torch.as_tensor((rec["qp"] - rec["eps"]).ravel(),
                                                  dtype=torch.float32),
                     "occupied": torch.as_tensor((eps < ms.fermi_level).ravel()),
                     "kpts": rec["ibz_kpts"], "bands": (n1, n2), "eps": rec["eps"],
                     "qp": rec["qp"], "cpu_time_gw": rec["cpu_time_gw"],
                     "cpu_time_gs": rec["cpu_time_gs"]}
    return out


def split_states(data: dict[str, dict], held_out: Sequence[str] = HELD_OUT,
                 test_fraction: float = 0.1, seed: int = 0, val_materials: int = 0) -> dict:
    """The paper's split: held-out materials excluded entirely, the other materials' states
    (in ``data``'s order) split randomly 90/10 into train/test with ``seed``.

    val_materials > 0: that many further training materials (drawn with ``seed``) are set
    aside whole as the early-stopping set, so that stopping rewards generalization to unseen
    materials and the test states stay untouched; otherwise the test states double as the
    early-stopping set. Returns train_names, x (N, F), y (N,) eV, occupied (N,) bool of the
    training materials, the index tensors tr, te into them, val_names and ``stop`` (x, y) of
    the early-stopping set.
    """
    train_names = [n for n in data if n not in held_out]
    val_names: list[str] = []
    if val_materials:
        rng = np.random.default_rng([seed, 1])
        val_names = sorted(rng.choice(train_names, size=val_materials, replace=False).tolist())
        train_names = [n for n in train_names if n not in val_names]
    if not train_names:
        raise ValueError("no G0W0 materials left for training after the held-out ones")
    y = torch.cat([data[n]["y"] for n in train_names])
    x = torch.cat([data[n]["x"] for n in train_names])
    perm = np.random.default_rng(seed).permutation(len(y))
    ntest = max(1, int(round(test_fraction * len(y))))
    te, tr = torch.as_tensor(perm[:ntest]), torch.as_tensor(perm[ntest:])
    stop = (x[te], y[te])
    if val_names:
        stop = tuple(torch.cat([data[n][k] for n in val_names]) for k in ("x", "y"))
    return {"train_names": train_names, "x": x, "y": y,
            "occupied": torch.cat([data[n]["occupied"] for n in train_names]),
            "te": te, "tr": tr, "val_names": val_names, "stop": stop}


def energy_column(model: GWModel) -> torch.Tensor:
    """Column of eps_nk - E_F in the model's raw features."""
    return torch.as_tensor(model.feature_columns("energy"))


def restrict_features(model: GWModel, data: dict[str, dict], features: str
                      ) -> tuple[GWModel, dict[str, dict]]:
    """``model`` with a fresh head on the subset ``features`` of its inputs, and ``data``
    (encoded by ``model``) with only those columns."""
    cols = torch.as_tensor(model.feature_columns(features))
    sub = {n: {**d, "x": d["x"][:, cols]} for n, d in data.items()}
    return model.with_features(features), sub


# Feature sets tried by leave-one-material-out selection; "energy" alone is the baseline and
# is not a candidate (the model must use the Kohn-Sham states).
CANDIDATE_FEATURES = ("full", "state_density", "state_super", "state")


def leave_one_material_out(model: GWModel, data: dict[str, dict], features: str,
                           held_out: Sequence[str] = HELD_OUT, workdir: str | Path = "runs/gw/cv",
                           epochs: int = 1000, patience: int = 100, seed: int = 0,
                           progress: bool = False) -> dict[str, float]:
    """MAE (eV) of a head on ``features`` for each training material when it is left out of
    the fit (early stopping on 10 % of the other materials' states). The held-out materials
    take no part, so the choice of inputs made from these numbers never sees them."""
    _, sub = restrict_features(model, data, features)
    names = [n for n in sub if n not in held_out]
    out = {}
    for name in names:
        fold = {n: sub[n] for n in names if n != name}
        split = split_states(fold, (), 0.1, seed)
        x, y, tr = (split[k] for k in ("x", "y", "tr"))
        head = train_head(model.with_features(features), x[tr], y[tr], *split["stop"],
                          Path(workdir) / features / name, epochs=epochs, seed=seed,
                          progress=progress, patience=patience)
        head.eval()
        with torch.no_grad():
            out[name] = float((head(sub[name]["x"]) - sub[name]["y"]).abs().mean())
    return out


def select_features(model: GWModel, data: dict[str, dict],
                    candidates: Sequence[str] = CANDIDATE_FEATURES,
                    held_out: Sequence[str] = HELD_OUT, workdir: str | Path = "runs/gw/cv",
                    epochs: int = 1000, patience: int = 100, seed: int = 0,
                    progress: bool = True) -> tuple[str, dict]:
    """The candidate input set with the lowest mean leave-one-material-out MAE; returns it
    and the table {features: {material: MAE, "mean": MAE}} (eV)."""
    from tqdm.auto import tqdm

    table = {}
    for feats in tqdm(candidates, desc="leave-one-material-out", disable=not progress):
        per = leave_one_material_out(model, data, feats, held_out, workdir, epochs, patience,
                                     seed)
        table[feats] = {**per, "mean": float(np.mean(list(per.values())))}
    best = min(table, key=lambda f: table[f]["mean"])
    return best, table


def fit_baselines(model: GWModel, split: dict, workdir: str | Path, epochs: int = 1000,
                  seed: int = 0, progress: bool = True, patience: int = 100
                  ) -> tuple[GWModel, dict[bool, float]]:
    """The two baselines on ``split``'s training states: a network of the head's shape on
    eps_nk - E_F alone, and a scissor shift (mean Sigma of occupied / of empty states, eV)."""
    x, y, occ, tr = (split[k] for k in ("x", "y", "occupied", "tr"))
    x_stop, y_stop = split["stop"]
    col = energy_column(model)
    base = GWModel(**{**model.hparams, "features": "energy"})
    base = train_head(base, x[tr][:, col], y[tr], x_stop[:, col], y_stop,
                      Path(workdir) / "energy_only", epochs=epochs, seed=seed,
                      progress=progress, patience=patience)
    scissor = {True: float(y[tr][occ[tr]].mean()), False: float(y[tr][~occ[tr]].mean())}
    return base, scissor


@torch.no_grad()
def score_gw(model: GWModel, base: GWModel, scissor: dict[bool, float], data: dict[str, dict],
             split: dict, held_out: Sequence[str] = HELD_OUT) -> dict:
    """MAEs (eV) of the model and both baselines on the training states, the test states and
    every held-out material in ``data`` (and all of them together)."""
    col = energy_column(model)

    def maes(xs, ys, occs) -> dict[str, float]:
        sc = torch.where(occs, scissor[True], scissor[False])
        return {"n": len(ys), "model": float((model(xs) - ys).abs().mean()),
                "energy_only_nn": float((base(xs[:, col]) - ys).abs().mean()),
                "scissor": float((sc - ys).abs().mean())}

    x, y, occ, tr, te = (split[k] for k in ("x", "y", "occupied", "tr", "te"))
    res = {"train_materials": split["train_names"], "scissor_shift_eV": scissor,
           "train": maes(x[tr], y[tr], occ[tr]), "test_states": maes(x[te], y[te], occ[te])}
    if split["val_names"]:
        res["val_materials"] = split["val_names"]
        res["val"] = maes(*(torch.cat([data[n][k] for n in split["val_names"]])
                            for k in ("x", "y", "occupied")))
    ho = [n for n in data if n in held_out]
    for n in ho:
        res[f"heldout_{n}"] = maes(data[n]["x"], data[n]["y"], data[n]["occupied"])
    if ho:
        res["heldout_materials"] = maes(*(torch.cat([data[n][k] for n in ho])
                                          for k in ("x", "y", "occupied")))
    return res


def fit_gw(model: GWModel, data: dict[str, dict], workdir: str | Path,
           held_out: Sequence[str] = HELD_OUT, test_fraction: float = 0.1, seed: int = 0,
           epochs: int = 1000, progress: bool = True, patience: int = 100,
           val_materials: int = 0, features: str | None = None) -> tuple[GWModel, dict]:
    """Train the GW head and the two baselines on the same split; MAEs (eV) of all three
    (see :func:`split_states`, :func:`fit_baselines`, :func:`score_gw`). ``features``: a
    subset of the model's inputs for the head (default: all the model computes)."""
    if features is not None and features != model.hparams["features"]:
        model, data = restrict_features(model, data, features)
    split = split_states(data, held_out, test_fraction, seed, val_materials)
    x, y, tr = (split[k] for k in ("x", "y", "tr"))
    model = train_head(model, x[tr], y[tr], *split["stop"], Path(workdir) / "head",
                       epochs=epochs, seed=seed, progress=progress, patience=patience)
    base, scissor = fit_baselines(model, split, workdir, epochs, seed, progress, patience)
    model.eval()
    base.eval()
    res = score_gw(model, base, scissor, data, split, held_out)
    res.update(seed=seed, test_fraction=test_fraction, epochs=epochs, patience=patience,
               n_val_materials=val_materials, features=model.hparams["features"])
    return model, res


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
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--max-per-material", type=int, default=None)
    v.add_argument("--patience", type=int, default=10)
    v.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("inputs", help="precompute (cache) raw inputs of G0W0 materials")
    c.add_argument("--gw", default="data/gw_monolayers.h5")
    c.add_argument("--gpw-dir", default="runs/gw_ref")
    c.add_argument("--cache", default="data/raw/gw_inputs.h5")
    c.add_argument("--wait-for", nargs="*", default=[], help="poll until these are complete")
    c.add_argument("--only", nargs="*", default=None, help="just these materials")
    a = sub.add_parser("assemble", help="combine three VAEs into one GW model file")
    a.add_argument("--state", required=True)
    a.add_argument("--super", required=True)
    a.add_argument("--density", required=True)
    a.add_argument("--out", required=True)
    h = sub.add_parser("head", help="supervised GW head on G0W0 data (encoders frozen)")
    h.add_argument("--model", required=True, help="GW model file (VAEs trained)")
    h.add_argument("--gw", default="data/gw_monolayers.h5")
    h.add_argument("--gpw-dir", default="runs/gw_ref")
    h.add_argument("--cache", default="data/raw/gw_inputs.h5")
    h.add_argument("--workdir", default="runs/gw/head")
    h.add_argument("--epochs", type=int, default=1000)
    h.add_argument("--patience", type=int, default=100)
    h.add_argument("--materials", nargs="*", default=None, help="subset of the G0W0 file")
    h.add_argument("--seed", type=int, default=0, help="split and initialization seed")
    h.add_argument("--val-materials", type=int, default=0,
                   help="training materials set aside whole for early stopping")
    h.add_argument("--features", default="full",
                   choices=[*CANDIDATE_FEATURES, "auto"],
                   help="head inputs; 'auto' picks the set with the lowest "
                        "leave-one-material-out MAE on the training materials")
    h.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "vae":
        model, info = train_vae(args.data, args.kind, args.workdir, args.channels, args.latent,
                                args.beta, args.epochs, args.batch_size, args.lr, seed=args.seed,
                                max_per_material=args.max_per_material, patience=args.patience)
        model.save(Path(args.workdir) / "model.pt", extra=info)
        print(json.dumps(info))
    elif args.cmd == "assemble":
        model = assemble(args.state, args.super, args.density)
        extras = {k: load_checkpoint(getattr(args, k))["extra"] for k in ("state", "super",
                                                                            "density")}
        model.save(args.out, extra={"vae_training": extras, "head": "untrained"})
        print(f"wrote {args.out}")
    elif args.cmd == "inputs":
        import time

        pending = list(dict.fromkeys(gw_materials(args.gw) + list(args.wait_for)))
        if args.only is not None:
            pending = [n for n in pending if n in args.only]
        while pending:
            ready = [n for n in pending if n in gw_materials(args.gw)]
            for name in ready:
                gw_inputs(args.gw, name, args.gpw_dir, args.cache)
                print(f"{name}: inputs cached", flush=True)
                pending.remove(name)
            if pending:
                time.sleep(60)
    elif args.cmd == "head":
        model = GWModel.load(args.model)
        extra = dict(model.checkpoint_meta["extra"])
        names = [n for n in gw_materials(args.gw)
                 if args.materials is None or n in args.materials]
        data = head_data(model, args.gw, names, args.gpw_dir, args.cache)
        features, selection = args.features, None
        if features == "auto":
            features, selection = select_features(model, data,
                                                  workdir=Path(args.workdir) / "cv",
                                                  epochs=args.epochs, patience=args.patience,
                                                  seed=args.seed)
            print(json.dumps({"selected": features, "leave_one_material_out": selection},
                             indent=1))
        model, res = fit_gw(model, data, args.workdir, epochs=args.epochs,
                            patience=args.patience, seed=args.seed,
                            val_materials=args.val_materials, features=features)
        if selection is not None:
            res["feature_selection"] = {"selected": features,
                                        "leave_one_material_out_MAE_eV": selection}
        extra.update(head="trained", head_training=res)
        model.save(args.out, extra=extra, data_hash=hash_file(args.gw))
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
