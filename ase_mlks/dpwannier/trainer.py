"""DPWannierTrainer: two-stage training of DPWannierModel on the GPAW reference data.

Stage 1 fits the force field (descriptor + fitting nets) on energies and forces (and stress
where the reference has it). Stage 2 freezes it and fits the Hamiltonian heads (on-site,
intra-layer, inter-layer, environment tensors) on the Wannier H(R) elements. Afterwards the
vacuum-level alignment polynomial is fitted to the per-layer on-site residuals. Both stages
run on ``core.training.Trainer`` (resumable from ``workdir/stage*/last.pt``, DDP under
torchrun). Reproduce the shipped model with the command in docs/dpwannier.md.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch

from ase_mlks.core.checkpoint import hash_file, load_checkpoint
from ase_mlks.core.dataset import StructureDataset
from ase_mlks.core.errors import AseMlksError, CheckpointError
from ase_mlks.core.training import Trainer, distributed_context, seed_everything

from .data import (
    DPWannierData,
    Sample,
    collate,
    find_hamiltonian_group,
    kpoint_density,
    merge_datasets,
)
from .graph import batch_graphs
from .model import DPWannierModel

H_THRESHOLD = 1e-3  # eV: elements counted in the H metrics (as the paper)
# Stage 1 skips records sampled more coarsely than this (k_i·|a_i|, Å): their energies and
# forces are another level of theory. The Γ-only 21.79° cells (8.4 Å), kept for their
# Hamiltonians, have forces ~19 meV/Å off the same cells at 2x2 k (17 Å; docs/reference.md).
MIN_KPOINT_DENSITY = 15.0
DATA_HPARAMS = ("min_distance",)
# Head options a trained model can be grown into (DPWannierModel.grow_from).
GROWABLE = ("bond_products", "interlayer_environment", "ff_correction", "bond_chirality")
# Head widths a trained model can be widened to (new units start disconnected from the output).
WIDENABLE = ("intra_hidden", "inter_hidden", "onsite_hidden")
# The sizes of a growable part: free to choose when the old model lacks that part.
GROWABLE_SIZES = {"ff_correction": ("correction_embed", "correction_axis", "correction_fit",
                                    "correction_species_stats"),
                  "bond_chirality": ("chirality_channels",)}
# What defines a force field: these hyper-parameters must agree to reuse one (``init_ff``).
FF_HPARAMS = ("species", "rc", "rcs", "embed", "axis", "fit", "env_norm", "ff_correction",
              "correction_embed", "correction_axis", "correction_fit",
              "correction_species_stats")
# The force field's trained modules and its data-derived buffers: one definition for both
# the stage-1 parameters (``ff_parameters``) and what ``init_ff`` copies.
FF_MODULES = ("descriptor", "fit_hidden", "fit_out", "correction")
FF_BUFFERS = ("d_mean", "d_std", "e_bias", "e_scale")
FF_PREFIXES = tuple(f"{m}." for m in FF_MODULES) + FF_BUFFERS
# Hyper-parameters a checkpoint written before they existed holds at their default.
HPARAM_DEFAULTS = {k: list(v.default) if isinstance(v.default, tuple) else v.default
                   for k, v in inspect.signature(DPWannierModel).parameters.items()}


def saved_hparam(hparams: dict, key: str):
    """``hparams[key]`` of a checkpoint, or the default for checkpoints older than ``key``."""
    return hparams.get(key, HPARAM_DEFAULTS.get(key))


def stable_split(keys: Sequence[str], val_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Train/held-out split by a hash of each key: stable while the data set grows."""
    train, val = [], []
    for k in sorted(keys):
        h = int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 16**8
        (val if h < val_fraction else train).append(k)
    return train, val


def ff_parameters(model: DPWannierModel, correction_only: bool = False
                  ) -> list[torch.nn.Parameter]:
    """Force-field parameters (with ``correction_only``: those of the energy correction)."""
    modules = ("correction",) if correction_only else FF_MODULES
    return [p for m in modules if getattr(model, m) is not None
            for p in getattr(model, m).parameters()]


def h_parameters(model: DPWannierModel) -> list[torch.nn.Parameter]:
    return [*model.heads.parameters(), *model.env_weights.parameters()]


def _freeze(model: DPWannierModel, stage: int, correction_only: bool = False) -> None:
    """Train the force field in stage 1 (only its correction if asked), the heads in 2."""
    for p in ff_parameters(model):
        p.requires_grad_(stage == 1 and not correction_only)
    for p in ff_parameters(model, correction_only=True):
        p.requires_grad_(stage == 1)
    for p in h_parameters(model):
        p.requires_grad_(stage == 2)


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def force_field_loss(model, batch: Sample, w_energy: float = 1.0, w_forces: float = 1.0,
                     w_stress: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE of per-atom energies (eV/atom)^2 and forces (eV/Å)^2; metrics in meV."""
    dtype = _dtype(model)
    g = batch.graph.to(dtype)
    use_stress = w_stress > 0 and batch.stress is not None
    out = model(g, forces=True, stress=use_stress, create_graph=model.training)
    n = g.natoms.to(dtype)
    de = (out["energy"] - batch.energy.to(dtype)) / n
    df = out["forces"] - batch.forces.to(dtype)
    loss = w_energy * (de**2).mean() + w_forces * (df**2).mean()
    metrics = {"e_mae_meV_atom": 1e3 * float(de.detach().abs().mean()),
               "f_mae_meV_A": 1e3 * float(df.detach().abs().mean())}
    if use_stress:
        ds = out["stress"] - batch.stress.to(dtype)
        loss = loss + w_stress * (ds**2).mean()
        metrics["s_mae_meV_A3"] = 1e3 * float(ds.abs().mean())
    return loss, metrics


def element_masks(model: DPWannierModel, batch: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the real on-site (N, nmax, nmax) and hopping (H, ...) elements."""
    g = batch.graph
    om = model.orbital_mask(g.species)
    on = om[:, :, None] & om[:, None, :]
    hop = om[g.h_i][:, :, None] & om[g.h_j][:, None, :] & batch.hop_mask[:, None, None]
    return on, hop


def hop_geometry(model: DPWannierModel, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Length (Å) and inter-layer flag of every hopping edge of graph ``g``: (H,), (H,)."""
    r = model._vectors(g.positions, g.cell, g.batch, g.h_i, g.h_j, g.h_shift).norm(dim=1)
    return r, g.layer[g.h_i] != g.layer[g.h_j]


# Å: Mo-S, Mo-Mo/S-S, 2nd, 3rd neighbours, tails (the metrics' shells, not the loss's)
REPORT_SHELLS = (0.0, 2.6, 3.5, 4.5, 6.0, 9.0)


def hopping_shell_table(ref: np.ndarray, pred: np.ndarray, r: np.ndarray, inter: np.ndarray,
                        shells: Sequence[float] = REPORT_SHELLS) -> list[dict]:
    """Hopping errors per pair-distance shell and intra/inter-layer (|H_ref| > 1 meV).

    ``ref``, ``pred``: hopping elements (eV); ``r``: pair length (Å) and ``inter``: inter-layer
    flag of each element, all (M,). Rows: MAE and mean |H| (meV) and the least-squares slope
    of ``pred`` on ``ref`` (1 = right size; < 1 = shrunk towards zero, which narrows bands).
    """
    rows = []
    for lo, hi in zip(shells[:-1], shells[1:]):
        for is_inter in (False, True):
            m = (r >= lo) & (r < hi) & (inter == is_inter) & (np.abs(ref) > H_THRESHOLD)
            if m.sum() < 10:
                continue
            rows.append({"shell_A": [lo, hi], "pairs": "inter" if is_inter else "intra",
                         "n": int(m.sum()), "mean_abs_ref_meV": 1e3 * float(np.abs(ref[m]).mean()),
                         "mae_meV": 1e3 * float(np.abs(pred[m] - ref[m]).mean()),
                         "slope": float((pred[m] * ref[m]).sum() / (ref[m] ** 2).sum())})
    return rows


def wannier_h_errors(model: DPWannierModel, graph, ham, grid: Sequence[int],
                     margin: float = 0.5) -> dict:
    """The model's H-element errors against a reference Wannier H(R) of the same structure.

    ``graph``: the structure's model graph (float64, as ``DPWannierCalc.graph`` builds it);
    ``ham``: the reference ``TBHamiltonian``, built on an in-plane k-grid ``grid`` (n1, n2).
    Such an H(R) folds the images of pairs beyond the grid's Wigner-Seitz radius onto each
    other, so only pairs shorter than that radius minus ``margin`` (Å) are compared. Returns
    the MAE over |H_ref| > 1 meV (``h_mae_meV``), the on-site MAE over all on-site elements
    (meV), the element count and the pair-length limit (Å).
    """
    from .data import hamiltonian_targets

    lengths = np.linalg.norm(np.asarray(ham.cell)[:2], axis=1)
    max_pair_length = 0.5 * min(grid[0] * lengths[0], grid[1] * lengths[1]) - margin

    with torch.no_grad():
        out = model(graph, forces=False, hamiltonian=True)
    on, hop, _ = hamiltonian_targets(ham, graph, model.norb, model.nmax)
    vec = model._vectors(graph.positions, graph.cell, graph.batch, graph.h_i, graph.h_j,
                         graph.h_shift).norm(dim=1).numpy()
    om = model.orbital_mask(graph.species).numpy()
    hi, hj = graph.h_i.numpy(), graph.h_j.numpy()
    sel = (vec < max_pair_length)[:, None, None] & om[hi][:, :, None] & om[hj][:, None, :]
    m_on = om[:, :, None] & om[:, None, :]
    on_pred = out["onsite"].numpy()[m_on]
    ref = np.concatenate([on[m_on], hop[sel]])
    pred = np.concatenate([on_pred, out["hop"].numpy()[sel]])
    big = np.abs(ref) > H_THRESHOLD
    return {"h_mae_meV": 1e3 * float(np.mean(np.abs(ref[big] - pred[big]))),
            "h_onsite_mae_meV": 1e3 * float(np.mean(np.abs(on[m_on] - on_pred))),
            "h_elements": int(big.sum()), "h_pairs_within_A": float(max_pair_length)}


def shell_normalized_mse(inner, g, batch: Sample, on_m, hop_m, d_on, t_hop, d_hop,
                         shells: Sequence[float], w_onsite: float = 1.0) -> torch.Tensor:
    """Mean over element groups of MSE / mean square of the target (1 − R² per group).

    Groups: the on-site deviations from the mean levels, and the hoppings split by pair
    distance at ``shells`` (Å) and by intra/inter-layer. A plain MSE is dominated by the
    first neighbours (|H| ~ 0.5 eV); the ~100 small hoppings per atom beyond them (5–70 meV)
    then barely move the optimizer, are fitted at a third of their size, and their
    coherent sum in the Bloch sums narrows the bands (docs/dpwannier.md, session 9).
    ``d_on`` / ``t_hop``, ``d_hop``: on-site residuals and hopping targets / residuals (eV) of
    the elements selected by the masks ``on_m`` / ``hop_m``, as :func:`hamiltonian_loss` has them.
    ``w_onsite`` weights the on-site group: with one vote among ~10 hopping groups the on-site
    levels otherwise end up the largest element error.
    """
    dtype = d_hop.dtype
    eye = torch.diag_embed(inner.onsite_bias[g.species].to(dtype))
    t_on = (batch.onsite.to(dtype) - eye)[on_m]
    terms = [w_onsite * (d_on**2).mean() / ((t_on**2).mean() + 1e-6)]
    r, inter = hop_geometry(inner, g)
    shell = torch.bucketize(r, torch.as_tensor(list(shells), dtype=r.dtype))
    group = (2 * shell + inter.long())[:, None, None].expand(hop_m.shape)[hop_m]
    for k in torch.unique(group).tolist():
        m = group == k
        terms.append((d_hop[m]**2).mean() / ((t_hop[m]**2).mean() + 1e-6))
    return torch.stack(terms).mean()


def hamiltonian_loss(model, batch: Sample, w_onsite: float = 1.0, w_elements: float = 1.0,
                     w_bands: float = 1.0, shells: Sequence[float] | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-2 loss: MSE over the reference H elements inside the cutoff (``w_elements``)
    plus MSE of the model's band energies vs the DFT bands at the SCF k-points
    (``w_bands``; occupied manifold + lowest conduction bands). With ``shells`` (Å) the
    element term is :func:`shell_normalized_mse` instead of one MSE. Metrics: H MAE (meV)
    over |H| > 1 meV elements, band MAE (meV)."""
    dtype = _dtype(model)
    g = batch.graph.to(dtype)
    out = model(g, forces=False, hamiltonian=True)
    inner = model.module if hasattr(model, "module") else model
    on_m, hop_m = element_masks(inner, batch)
    d_on = (out["onsite"] - batch.onsite.to(dtype))[on_m]
    t_hop = batch.hop.to(dtype)[hop_m]
    d_hop = out["hop"][hop_m] - t_hop
    if shells:
        loss = w_elements * shell_normalized_mse(inner, g, batch, on_m, hop_m, d_on, t_hop,
                                                 d_hop, shells, w_onsite)
    else:
        loss = w_elements * (w_onsite * (d_on**2).mean() + (d_hop**2).mean())
    big = t_hop.abs() > H_THRESHOLD
    d_all = torch.cat([d_on, d_hop[big]])
    metrics = {"h_mae_meV": 1e3 * float(d_all.detach().abs().mean()),
               "onsite_mae_meV": 1e3 * float(d_on.detach().abs().mean()),
               "hop_mae_meV": 1e3 * float(d_hop[big].detach().abs().mean())}
    if w_bands > 0 and batch.eig_ref is not None:
        band_loss, band_abs = 0.0, 0.0
        for b, (ref, kp, w) in enumerate(zip(batch.eig_ref, batch.eig_kpts,
                                             batch.eig_weights)):
            eps = inner.bloch_eigenvalues(g, out["onsite"], out["hop"], b, kp)
            diff = eps[:, :ref.shape[1]] - ref.to(dtype)
            band_loss = band_loss + (w.to(dtype)[:, None] * diff**2).sum() / ref.shape[1]
            band_abs += float((w.to(dtype)[:, None] * diff.detach().abs()).sum()) / ref.shape[1]
        n = len(batch.eig_ref)
        loss = loss + w_bands * band_loss / n
        metrics["band_mae_meV"] = 1e3 * band_abs / n
    return loss, metrics


@torch.no_grad()
def initialize_from_data(model: DPWannierModel, samples: Sequence[Sample]) -> None:
    """Descriptor normalization, per-species energy bias and mean on-site energies.

    (The closest approach is set by the trainer from all its training structures.)
    """
    dtype = _dtype(model)
    g = batch_graphs([s.graph for s in samples]).to(dtype)
    model.set_descriptor_stats(g)
    counts = np.array([np.bincount(s.graph.species.numpy(), minlength=len(model.species))
                       for s in samples], float)
    energies = np.array([float(s.energy[0]) for s in samples])
    bias, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    model.e_bias.copy_(torch.as_tensor(bias, dtype=model.e_bias.dtype))
    set_onsite_bias(model, samples)


@torch.no_grad()
def closest_approach(model: DPWannierModel, samples: Sequence[Sample]) -> float:
    """Closest approach the calculator accepts (Å): 85% of the shortest distance in the data.

    Below that the force field has seen nothing, so the calculator refuses the structure.
    """
    g = batch_graphs([s.graph for s in samples]).to(_dtype(model))
    vec = model._vectors(g.positions, g.cell, g.batch, g.ff_i, g.ff_j, g.ff_shift)
    return 0.85 * float(vec.norm(dim=1).min())


@torch.no_grad()
def set_onsite_bias(model: DPWannierModel, samples: Sequence[Sample]) -> None:
    """Mean on-site energy of every orbital of every species (the heads learn the rest)."""
    with_h = [s for s in samples if s.onsite is not None]
    if with_h:
        on = torch.cat([s.onsite for s in with_h])
        sp = torch.cat([s.graph.species for s in with_h])
        for a in range(len(model.species)):
            if (sp == a).any():
                diag = torch.diagonal(on[sp == a], dim1=1, dim2=2).mean(0)
                model.onsite_bias[a].copy_(diag.to(model.onsite_bias.dtype))


@torch.no_grad()
def fit_alignment(model: DPWannierModel, samples: Sequence[Sample]) -> dict:
    """Fit C(strain, N_out/N_in) to per-layer mean on-site diagonal residuals (eV)."""
    saved = model.alignment.coef.clone()
    model.alignment.coef.zero_()
    feats, shifts = [], []
    dtype = _dtype(model)
    for s in samples:
        if s.onsite is None:
            continue
        g = s.graph.to(dtype)
        out = model(g, forces=False, hamiltonian=True)
        om = model.orbital_mask(g.species)
        resid = torch.diagonal(s.onsite.to(dtype) - out["onsite"], dim1=1, dim2=2)
        for lay in range(len(g.layer_feat)):
            sel = g.layer == lay
            shifts.append(float(resid[sel][om[sel]].mean()))
            feats.append(g.layer_feat[lay].double().numpy())
    if not feats:
        model.alignment.coef.copy_(saved)
        return {"fitted": False}
    feats_a = np.array(feats)
    r2 = model.alignment.fit(feats_a, np.array(shifts))
    return {"fitted": True, "n_layers": len(feats), "r2": r2,
            "strain_range": [float(feats_a[:, 0].min()), float(feats_a[:, 0].max())],
            "ratio_range": [float(feats_a[:, 1].min()), float(feats_a[:, 1].max())],
            "mean_shift_meV": 1e3 * float(np.mean(shifts)),
            "coef": model.alignment.coef.tolist()}


def full_batch(n: int) -> int:
    """Global batch holding every training structure once, divisible by the process count
    (under DDP the sampler pads the last process's share with repeated structures)."""
    _, world = distributed_context()
    return -(-n // world) * world


class DPWannierTrainer:
    """Two-stage trainer (force field, then Hamiltonian heads) on a reference HDF5 file.

    Args:
        data: reference HDF5 (``ase_mlks.reference`` bilayer data).
        workdir: run directory (stage1/, stage2/ with last.pt, best.pt, metrics.jsonl).
        model_kwargs: DPWannierModel hyper-parameters.
        val_fraction: held-out fraction (stable hash split of the keys).
        prefix: only keys starting with this (None: all structures).
        max_structures: cap on the number of structures used (None: all).
        dtype: training precision (float32 is ~2x faster on CPU).
        init_ff: checkpoint (a stage-1 ``best.pt`` or a saved model) whose force field the
            new model starts from — for fitting new Hamiltonian heads (stage 2 only) on a
            trained force field. Its force-field hyper-parameters must match.
        init_model: checkpoint whose whole state (force field and heads) the new run starts
            from — for fine-tuning the heads with other loss weights in a fresh workdir.
        min_kpoint_density: stage 1 (energies, forces) leaves out records whose reference
            k-grid is coarser than this (``data.kpoint_density``, Å) and says so; stage 2
            uses them (their Hamiltonians are fine). None: use every record.
    """

    def __init__(self, data: str | os.PathLike, workdir: str | os.PathLike = "runs/dpwannier",
                 model_kwargs: dict | None = None, val_fraction: float = 0.2,
                 prefix: str | None = None, max_structures: int | None = None,
                 dtype: torch.dtype = torch.float32, progress: bool = True, seed: int = 0,
                 init_ff: str | os.PathLike | None = None,
                 init_model: str | os.PathLike | None = None,
                 min_kpoint_density: float | None = MIN_KPOINT_DENSITY):
        self.data = Path(data)
        self.workdir = Path(workdir)
        self.progress, self.seed = progress, seed
        with StructureDataset(self.data, "r") as ds:
            keys = sorted(k for k in ds.keys() if prefix is None or k.startswith(prefix))
        if max_structures is not None:
            keys = keys[:max_structures]
        self.train_keys, self.val_keys = stable_split(keys, val_fraction)
        if not self.train_keys:  # tiny data set: a model needs something to train on
            self.train_keys, self.val_keys = self.val_keys, []
        with StructureDataset(self.data, "r") as ds:
            self.h_keys = {k for k in keys if find_hamiltonian_group(ds.group(k)) is not None}
            density = {k: kpoint_density(ds.group(k)) for k in keys}
        # records too coarsely sampled for the force field (stage 1), by their k-grid
        self.min_kpoint_density = min_kpoint_density
        self.coarse_keys = {k: d for k, d in density.items() if d is not None
                            and min_kpoint_density is not None and d < min_kpoint_density}
        # Seed before building the model: its initial weights are drawn here, so without
        # this two runs with the same --seed would differ in more than batch order.
        seed_everything(seed)
        self.model = DPWannierModel(**(model_kwargs or {})).to(dtype)
        self.train_set = DPWannierData(self.data, self.train_keys, self.model)
        self.val_set = DPWannierData(self.data, self.val_keys, self.model) if self.val_keys \
            else None
        self.data_hash = hash_file(self.data)
        self.heads_given = init_model is not None
        init = self.workdir / "init.pt"
        if init.exists():
            saved = torch.load(init, map_location="cpu", weights_only=False)
            self.model.load_state_dict(saved["state_dict"])
            self._apply_data_hparams(saved["data_hparams"])
        else:
            # the energy bias comes from these: only references at the force field's level
            first = [i for i, k in enumerate(self.train_keys) if k not in self.coarse_keys][:16]
            first = first or list(range(min(16, len(self.train_set))))
            initialize_from_data(self.model, [self.train_set[i] for i in first])
            if init_ff is not None:
                self._load_force_field(init_ff)
            if init_model is not None:
                grown = self._load_model(init_model)
                if "bond_chirality" in grown:  # its scale must see the trained env tensors
                    self.model.set_chirality_scale(batch_graphs(
                        [self.train_set[i].graph for i in first]).to(dtype))
            train = [self.train_set[i] for i in range(len(self.train_set))]
            dmin = closest_approach(self.model, train)
            if init_ff is not None or init_model is not None:
                # new data (strained cells, say) may come closer than the old model's data
                dmin = min(self.model.min_distance, dmin)
            self._apply_data_hparams({"min_distance": round(dmin, 3)})
            rank, _ = distributed_context()
            if rank == 0:
                self.workdir.mkdir(parents=True, exist_ok=True)
                torch.save({"state_dict": self.model.state_dict(),
                            "data_hparams": {k: self.model.hparams[k] for k in DATA_HPARAMS}},
                           init)

    def _load_force_field(self, path: str | os.PathLike) -> None:
        """Copy the force-field weights, normalization and closest approach from ``path``."""
        ck = load_checkpoint(path)
        mine = self.model.hparams
        bad = [k for k in FF_HPARAMS if saved_hparam(ck["hparams"], k) != mine.get(k)]
        if bad:
            raise CheckpointError(
                f"{path}: force field differs in {', '.join(bad)} "
                f"({[saved_hparam(ck['hparams'], k) for k in bad]} vs "
                f"{[mine.get(k) for k in bad]})")
        ff = {k: v for k, v in ck["state_dict"].items() if k.startswith(FF_PREFIXES)}
        state = self.model.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in ff.items()})
        self.model.load_state_dict(state)
        self._apply_data_hparams({k: ck["hparams"][k] for k in DATA_HPARAMS})

    def _load_model(self, path: str | os.PathLike) -> list[str]:
        """Start from the complete state of the model saved at ``path``; returns the
        growable options the saved model lacked (their parts start at zero output)."""
        ck = load_checkpoint(path)
        added = [k for k in GROWABLE
                 if self.model.hparams.get(k) and not saved_hparam(ck["hparams"], k)]
        widened = [k for k in WIDENABLE
                   if list(self.model.hparams[k]) != list(saved_hparam(ck["hparams"], k))]
        free = {*GROWABLE, *DATA_HPARAMS, *widened,
                *(s for k in added for s in GROWABLE_SIZES.get(k, ()))}
        grows = bool(added or widened) and all(saved_hparam(ck["hparams"], k) == v
                                               for k, v in self.model.hparams.items()
                                               if k not in free)
        try:
            if grows:  # richer or wider heads, an energy correction: new weights start at zero
                old = DPWannierModel(**ck["hparams"])
                old.load_state_dict(ck["state_dict"])
                self.model.grow_from(old)
            else:
                self.model.load_state_dict(ck["state_dict"])
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path} does not fit the model built from model_kwargs: "
                                  f"{str(err).splitlines()[0]}") from err
        self._apply_data_hparams({k: ck["hparams"][k] for k in DATA_HPARAMS})
        return added if grows else []

    def _apply_data_hparams(self, values: dict) -> None:
        """Hyper-parameters measured from the data (closest approach, electron count)."""
        self.model.hparams.update(values)
        self.model.min_distance = values["min_distance"]

    def _subsets(self, keep) -> tuple[DPWannierData, DPWannierData | None]:
        """Training and held-out samples of the keys for which ``keep(key)`` is true."""
        tk = [k for k in self.train_keys if keep(k)]
        vk = [k for k in self.val_keys if keep(k)]
        return (DPWannierData(self.data, tk, self.model),
                DPWannierData(self.data, vk, self.model) if vk else None)

    def _trainer(self, stage: int, epochs: int, lr: float, batch_size: int,
                 lr_patience: int = 8, patience: int = 40, loss_weights: dict | None = None,
                 optimizer: str = "adam", correction_only: bool = False, **kw) -> Trainer:
        if correction_only and self.model.correction is None:
            raise AseMlksError("correction_only needs a model with ff_correction=True")
        _freeze(self.model, stage, correction_only)
        params = (ff_parameters(self.model, correction_only) if stage == 1
                  else h_parameters(self.model))
        loss = functools.partial(force_field_loss if stage == 1 else hamiltonian_loss,
                                 **(loss_weights or {}))
        if stage == 2:  # only structures whose reference has a Wannier H(R)
            train, val = self._subsets(lambda k: k in self.h_keys)
            if not len(train):
                raise AseMlksError("no training structure has a Wannier H(R): cannot fit the "
                                   "Hamiltonian heads")
        elif self.coarse_keys:  # stage 1: energies and forces at one level of theory
            train, val = self._subsets(lambda k: k not in self.coarse_keys)
            d = sorted(set(round(v, 1) for v in self.coarse_keys.values()))
            if distributed_context()[0] == 0:
                print(f"stage 1 leaves out {len(self.coarse_keys)} structures whose k-grid is "
                      f"coarser than the others (k·a = {d} Å < {self.min_kpoint_density:g}): their "
                      "forces are another level of theory; stage 2 uses their H(R)")
            if not len(train):
                raise AseMlksError("every training structure's k-grid is too coarse for the "
                                   "force field (min_kpoint_density)")
        else:
            train, val = self.train_set, self.val_set
        if optimizer == "lbfgs":
            batch_size = full_batch(len(train))
        return Trainer(self.model, loss, train, val, collate_fn=collate, optimizer=optimizer,
                       lr_patience=lr_patience, patience=patience,
                       batch_size=batch_size, lr=lr, max_epochs=epochs, parameters=params,
                       workdir=self.workdir / f"stage{stage}", progress=self.progress,
                       seed=self.seed, data_hash=self.data_hash,
                       checkpoint_extra={"stage": stage, "n_train": len(self.train_keys),
                                         "n_val": len(self.val_keys)}, **kw)

    def stage1(self, epochs: int = 200, lr: float = 5e-4, batch_size: int = 4,
               w_energy: float = 1.0, correction_only: bool = False, **kw) -> list[dict]:
        """Fit the force field on energies and forces (``kw``: lr_patience, patience,
        optimizer). ``correction_only``: train only the energy correction (``ff_correction``),
        so the RAER, and with it the trained heads' inputs, stay as they are.

        ``w_energy`` weighs the per-atom energy MSE (eV²) against the force MSE (eV²/Å²).
        With ``optimizer="lbfgs"`` every epoch is one full-batch L-BFGS step (``batch_size``
        is ignored): on 12 bilayers it reached a training force MAE of 56 meV/Å in 70
        steps, where Adam (batch 1 or full batch, lr 5e-4-3e-3) stalled at 200 meV/Å.
        lr 2e-3 with Adam and batch size 1 drove the tanh fitting net into saturation
        (constant energy, zero forces) within 20 epochs; 5e-4 trains. The energy
        correction is more fragile: Adam at lr 1e-3 moves its embedding (and so its
        standardized inputs) enough in one epoch to saturate its tanh layer; 1e-4 trains
        (docs/dpwannier.md, session 15).
        """
        return self._trainer(1, epochs, lr, batch_size, loss_weights={"w_energy": w_energy},
                             correction_only=correction_only, **kw).fit()

    def stage2(self, epochs: int = 200, lr: float = 2e-3, batch_size: int = 4,
               **kw) -> list[dict]:
        """Freeze the force field; fit the Hamiltonian heads on H(R) elements."""
        stage1_best = self.workdir / "stage1" / "best.pt"
        if stage1_best.exists() and not (self.workdir / "stage2" / "last.pt").exists():
            ff = torch.load(stage1_best, map_location="cpu", weights_only=False)["state_dict"]
            self.model.load_state_dict(ff)
        # A fine-tuned model keeps the on-site reference its heads were trained against.
        if not (self.workdir / "stage2" / "last.pt").exists() and not self.heads_given:
            set_onsite_bias(self.model, [self.train_set[i] for i in range(len(self.train_set))
                                         if self.train_keys[i] in self.h_keys])
        return self._trainer(2, epochs, lr, batch_size, **kw).fit()

    def finish(self, output: str | os.PathLike) -> dict:
        """Fit the vacuum alignment, evaluate on the held-out set, save the checkpoint."""
        _freeze(self.model, 0)
        self.model.eval()
        train = [self.train_set[i] for i in range(len(self.train_set))]
        info = {"alignment": fit_alignment(self.model, train),
                "n_train": len(self.train_keys), "n_val": len(self.val_keys),
                "n_train_hamiltonian": sum(k in self.h_keys for k in self.train_keys),
                "val_keys": self.val_keys}
        if self.val_set is not None:
            info["val"] = evaluate(self.model, [self.val_set[i] for i in range(len(self.val_set))],
                                   no_forces=self.coarse_keys)
        rank, _ = distributed_context()
        if rank == 0:
            self.model.save(output, data_hash=self.data_hash, extra=info)
        return info


def evaluate(model: DPWannierModel, samples: Sequence[Sample],
             no_forces: Collection[str] = ()) -> dict:
    """Energy/force/H errors over samples (meV units); samples whose key is in
    ``no_forces`` (references too coarse for the force field) count for H only."""
    dtype = _dtype(model)
    e_err, f_ref, f_pred, h_ref, h_pred = [], [], [], [], []
    for s in samples:
        g = s.graph.to(dtype)
        out = model(g, forces=True, hamiltonian=s.onsite is not None)
        if not set(s.keys) & set(no_forces):
            e_err.append(float((out["energy"][0].detach() - s.energy[0]) / len(s.forces)))
            f_ref.append(s.forces.numpy().ravel())
            f_pred.append(out["forces"].detach().double().numpy().ravel())
        if s.onsite is not None:
            on_m, hop_m = element_masks(model, s)
            h_ref += [s.onsite[on_m].numpy(), s.hop[hop_m].numpy()]
            h_pred += [out["onsite"].detach()[on_m].double().numpy(),
                       out["hop"].detach()[hop_m].double().numpy()]
    res: dict = {"n": len(samples), "n_forces": len(e_err)}
    if e_err:
        res["energy_mae_meV_atom"] = 1e3 * float(np.mean(np.abs(e_err)))
        res["force_mae_meV_A"] = 1e3 * float(np.mean(np.abs(np.concatenate(f_ref)
                                                             - np.concatenate(f_pred))))
    if h_ref:
        hr, hp = np.concatenate(h_ref), np.concatenate(h_pred)
        big = np.abs(hr) > H_THRESHOLD
        res["h_mae_meV"] = 1e3 * float(np.mean(np.abs(hr[big] - hp[big])))
        res["h_elements"] = int(big.sum())
    return res


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train DPWannierModel on GPAW reference data")
    p.add_argument("--data", nargs="+", default=["data/mos2_bilayer.h5"],
                   help="reference HDF5 file(s); several are merged into workdir/data.h5")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--workdir", default="runs/dpwannier")
    p.add_argument("--output", default="ase_mlks/pretrained/dpwannier-mos2-bilayer.pt")
    p.add_argument("--epochs1", type=int, default=200)
    p.add_argument("--epochs2", type=int, default=200)
    p.add_argument("--lr1", type=float, default=None,
                   help="stage-1 learning rate (default 1.0 for lbfgs, 5e-4 for adam)")
    p.add_argument("--w-energy", type=float, default=1.0,
                   help="stage-1 weight of the per-atom energy MSE relative to forces")
    p.add_argument("--lr2", type=float, default=None,
                   help="stage-2 learning rate (default 1.0 for lbfgs, 2e-3 for adam)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer1", choices=["adam", "lbfgs"], default="lbfgs",
                   help="stage-1 optimizer (lbfgs: one full-batch step per epoch)")
    p.add_argument("--optimizer2", choices=["adam", "lbfgs"], default="lbfgs",
                   help="stage-2 optimizer")
    p.add_argument("--w-bands", type=float, default=1.0,
                   help="stage-2 weight of the band-energy MSE (eV²)")
    p.add_argument("--shells", type=float, nargs="*", default=None,
                   help="stage 2: normalize the element loss per pair-distance shell with "
                        "these edges (Å), e.g. 2.6 3.5 4.5 6 (default: one plain MSE)")
    p.add_argument("--w-elements", type=float, default=1.0,
                   help="stage-2 weight of the H-element MSE (eV²)")
    p.add_argument("--w-onsite", type=float, default=1.0,
                   help="stage-2 weight of the on-site elements relative to the hoppings")
    p.add_argument("--schedule", choices=["plateau", "cosine"], default="plateau",
                   help="plateau: halve the LR after --lr-patience epochs without progress, "
                        "keep the best held-out epoch; cosine: fixed budget to --min-lr, keep "
                        "the last epoch")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 penalty on the trained parameters (Adam's weight_decay)")
    p.add_argument("--lr-patience", type=int, default=8, help="epochs before LR halves")
    p.add_argument("--patience", type=int, default=40, help="early-stopping epochs")
    p.add_argument("--prefix", default=None)
    p.add_argument("--max-structures", type=int, default=None)
    p.add_argument("--min-kpoint-density", type=float, default=MIN_KPOINT_DENSITY,
                   help="stage 1 leaves out records whose reference k-grid k_i·|a_i| (Å) is "
                        "below this (Γ-only Hamiltonian records); 0 keeps every record")
    p.add_argument("--model-kwargs", default="{}", help="JSON of DPWannierModel arguments")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the batch order and the data-dependent "
                        "initialization (the same seed and data reproduce a run)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="training precision (float64: slower, finer L-BFGS line searches)")
    p.add_argument("--stage", choices=["1", "2", "all"], default="all")
    p.add_argument("--init-ff", default=None,
                   help="start from this checkpoint's force field (e.g. another run's "
                        "stage1/best.pt; use with --stage 2 to fit new heads only)")
    p.add_argument("--correction-only", action="store_true",
                   help="stage 1: train only the energy correction (model kwarg ff_correction); "
                        "with --init-model the grown model keeps its RAER and heads and is "
                        "saved to --output after stage 1")
    p.add_argument("--init-model", default=None,
                   help="start from this saved model's full state (force field and heads; "
                        "use with --stage 2 to fine-tune the heads with new loss weights)")
    args = p.parse_args(argv)
    if args.lr1 is None:
        args.lr1 = 1.0 if args.optimizer1 == "lbfgs" else 5e-4
    if args.lr2 is None:
        args.lr2 = 1.0 if args.optimizer2 == "lbfgs" else 2e-3
    torch.set_num_threads(args.threads)
    data = args.data[0]
    if len(args.data) > 1:
        data = Path(args.workdir) / "data.h5"
        if not data.exists():
            merge_datasets(data, args.data)
    tr = DPWannierTrainer(data, args.workdir, json.loads(args.model_kwargs),
                          val_fraction=args.val_fraction, prefix=args.prefix,
                          max_structures=args.max_structures, init_ff=args.init_ff,
                          dtype=getattr(torch, args.dtype),
                          init_model=args.init_model, seed=args.seed,
                          min_kpoint_density=args.min_kpoint_density or None)
    print(f"train {len(tr.train_keys)} / held-out {len(tr.val_keys)} structures")
    if args.stage in ("1", "all"):
        tr.stage1(args.epochs1, args.lr1, args.batch_size, w_energy=args.w_energy,
                  lr_patience=args.lr_patience, patience=args.patience,
                  optimizer=args.optimizer1, correction_only=args.correction_only,
                  schedule=args.schedule, min_lr=args.min_lr, weight_decay=args.weight_decay)
        if args.stage == "1" and args.correction_only and args.init_model:
            # the heads came trained with the model and still fit its unchanged RAER
            info = tr.finish(args.output)
            print(json.dumps({k: v for k, v in info.items() if k != "val_keys"}, indent=1))
    if args.stage in ("2", "all"):
        tr.stage2(args.epochs2, args.lr2, args.batch_size, lr_patience=args.lr_patience,
                  patience=args.patience, optimizer=args.optimizer2,
                  schedule=args.schedule, min_lr=args.min_lr, weight_decay=args.weight_decay,
                  loss_weights={"w_bands": args.w_bands, "w_elements": args.w_elements,
                                "w_onsite": args.w_onsite, "shells": args.shells})
        info = tr.finish(args.output)
        print(json.dumps({k: v for k, v in info.items() if k != "val_keys"}, indent=1))


if __name__ == "__main__":
    main()
