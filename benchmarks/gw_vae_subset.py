"""Quick VAE check on a subset (used for the numbers in docs/gw.md when the full
benchmarks/gw.py run could not finish): 48 random states of held-out MoS2, the validation
states of MoSe2, and the MoS2 density.   python benchmarks/gw_vae_subset.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ase_mlks.gw.data import read_material
from ase_mlks.gw.model import GWModel
from ase_mlks.gw.trainer import material_split, pooled_r2, reconstruction_metrics


def main() -> None:
    torch.set_num_threads(1)
    model = GWModel.load("c2d-pbe")
    info = model.checkpoint_meta["extra"]["vae_training"]["state"]
    out = {}
    for name in ["MoS2", "MoSe2"]:
        ms = read_material("data/raw/gw_ks_dev.h5", name)
        x = ms.moduli[0].reshape(-1, *ms.moduli.shape[-3:])
        if name == "MoSe2":  # its validation states only
            idx = material_split(name, len(x), info["val_fraction"], info["seed"],
                                 info["max_per_material"])[1]
        else:  # held-out material: random states
            idx = np.random.default_rng(1).choice(len(x), 48, replace=False)
        r = reconstruction_metrics(model.state_vae, x[idx])
        out[name] = {"n": len(idx), "r2_mean": float(r["r2"].mean()),
                     "r2_pooled": pooled_r2(x[idx], r["reconstruction"]),
                     "norm_dev_mean": float(np.abs(r["norm_ratio"] - 1).mean())}
        print(name, out[name], flush=True)
        if name == "MoS2":
            out["MoS2_density_r2"] = float(
                reconstruction_metrics(model.density_vae, ms.density[None])["r2"][0])
            print("MoS2 density VAE R2", out["MoS2_density_r2"], flush=True)
    Path("benchmarks/out").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/out/gw_vae_subset.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
