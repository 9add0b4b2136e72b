"""GW-head training split, baselines and scores; monolayers of the KS data set (no GPAW)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ase_mlks.core.errors import StructureError
from ase_mlks.gw.data import build_monolayer
from ase_mlks.gw.model import GWModel
from ase_mlks.gw.trainer import (
    fit_baselines,
    fit_gw,
    score_gw,
    select_features,
    split_states,
)
from ase_mlks.structures import bilayer, monolayer


def small_model() -> GWModel:
    torch.manual_seed(0)
    return GWModel(vae=dict(channels=8, latent=4), super_vae=dict(channels=8, latent=4),
                   density_vae=dict(channels=8, latent=4))


def synthetic_data(model: GWModel, names, n: int = 40, seed: int = 0) -> dict[str, dict]:
    """Per material: random features whose first latent column sets Sigma, energies with
    half the states occupied (energy column negative)."""
    rng = np.random.default_rng(seed)
    nfeat = model.feature_size("full")
    col = model.state_vae.latent  # energy column
    out = {}
    for name in names:
        x = torch.as_tensor(rng.normal(size=(n, nfeat)), dtype=torch.float32)
        occ = torch.arange(n) % 2 == 0
        x[:, col] = torch.where(occ, -1.0, 1.0) + 0.1 * x[:, col]
        y = torch.where(occ, 0.3, 1.8) + 0.5 * x[:, 0]
        out[name] = {"x": x, "y": y, "occupied": occ}
    return out


def test_split_excludes_held_out_materials():
    model = small_model()
    data = synthetic_data(model, ["MoSe2", "MoS2", "BN", "CrS2"])
    split = split_states(data, held_out=("MoS2", "WS2", "CrS2"), test_fraction=0.1, seed=3)
    assert split["train_names"] == ["MoSe2", "BN"]
    assert len(split["y"]) == 80
    tr, te = split["tr"].numpy(), split["te"].numpy()
    assert len(te) == 8 and len(set(tr) | set(te)) == 80 and not set(tr) & set(te)
    again = split_states(data, held_out=("MoS2", "WS2", "CrS2"), test_fraction=0.1, seed=3)
    assert torch.equal(again["te"], split["te"])  # a rebuilt split is the same split


def test_fit_gw_scores_and_rebuilt_baselines(tmp_path):
    model = small_model()
    data = synthetic_data(model, ["A", "B", "MoS2"])
    model, res = fit_gw(model, data, tmp_path / "fit", epochs=3, progress=False, patience=3)
    assert bool(model.head_trained)
    assert res["train_materials"] == ["A", "B"]
    assert {"train", "test_states", "heldout_MoS2", "heldout_materials"} <= set(res)
    assert res["heldout_MoS2"]["n"] == 40
    split = split_states(data, seed=res["seed"], test_fraction=res["test_fraction"])
    y, occ, tr = split["y"], split["occupied"], split["tr"]
    assert res["scissor_shift_eV"][True] == pytest.approx(float(y[tr][occ[tr]].mean()))
    # what benchmarks/gw.py does: rebuild the split, refit the baselines, rescore the head
    base, scissor = fit_baselines(model, split, tmp_path / "bench", epochs=3, progress=False,
                                  patience=3)
    again = score_gw(model, base.eval(), scissor, data, split)
    assert again["train"]["model"] == pytest.approx(res["train"]["model"], rel=1e-6)
    assert again["heldout_MoS2"]["scissor"] == pytest.approx(res["heldout_MoS2"]["scissor"])


@pytest.mark.parametrize("name", ["MoS2", "ZrS2", "WTe2", "hBN"])
def test_ks_monolayers_are_the_shared_structures(name):
    atoms = build_monolayer(name)
    ref = monolayer(name, vacuum=5.0)
    assert np.allclose(atoms.positions, ref.positions)
    assert np.allclose(atoms.cell[:], ref.cell[:])
    assert atoms.pbc.all()  # the KS data set's plane-wave cells are periodic along z too


def test_monolayer_only_material_needs_an_interlayer_distance():
    assert len(monolayer("ZrS2")) == 3
    with pytest.raises(StructureError, match="interlayer distance known for ZrS2"):
        bilayer("ZrS2")
    assert len(bilayer("ZrS2", interlayer=5.8)) == 6


def test_whole_materials_for_early_stopping(tmp_path):
    model = small_model()
    data = synthetic_data(model, ["A", "B", "C", "D", "MoS2"])
    split = split_states(data, val_materials=2, seed=1)
    assert len(split["val_names"]) == 2 and not set(split["val_names"]) & {"MoS2"}
    assert sorted(split["train_names"] + split["val_names"]) == ["A", "B", "C", "D"]
    x_stop, y_stop = split["stop"]
    assert torch.equal(y_stop, torch.cat([data[n]["y"] for n in split["val_names"]]))
    assert len(split["y"]) == 80  # test states come from the two fitted materials only
    _, res = fit_gw(small_model(), data, tmp_path, epochs=2, progress=False, patience=2,
                    seed=1, val_materials=2)
    assert res["val_materials"] == split["val_names"] and res["val"]["n"] == 80


def test_feature_subsets_are_columns_of_the_full_features():
    model = small_model()
    mu, energy = torch.rand(5, 4), torch.linspace(-2, 2, 5)
    ctx = torch.rand(model.feature_size("full") - 5)
    full = model.features(mu, energy, ctx)
    for feats in ("state", "state_density", "state_super", "energy"):
        sub = model.with_features(feats)
        cols = torch.as_tensor(model.feature_columns(feats))
        assert torch.equal(sub.features(mu, energy, ctx), full[:, cols])
        assert not bool(sub.head_trained)
        for name, value in model.density_vae.state_dict().items():  # encoders are copied
            assert torch.equal(sub.density_vae.state_dict()[name], value)
    assert torch.equal(full[:, torch.as_tensor(model.feature_columns("energy"))][:, 0], energy)
    with pytest.raises(ValueError, match="does not compute"):
        model.with_features("state").feature_columns("full")


def test_leave_one_material_out_never_sees_held_out_materials(tmp_path):
    model = small_model()
    data = synthetic_data(model, ["A", "B", "C", "MoS2"])
    data["MoS2"]["y"] = torch.full_like(data["MoS2"]["y"], float("nan"))  # poison
    best, table = select_features(model, data, candidates=("full", "state"),
                                  workdir=tmp_path, epochs=3, patience=3, progress=False)
    assert set(table) == {"full", "state"} and best in table
    for row in table.values():
        assert set(row) == {"A", "B", "C", "mean"}
        assert np.isfinite(list(row.values())).all()
        assert row["mean"] == pytest.approx(np.mean([row[n] for n in "ABC"]))
    assert table[best]["mean"] == min(r["mean"] for r in table.values())
    fitted, res = fit_gw(model, data, tmp_path / "final", epochs=3, progress=False, patience=3,
                         features=best)
    assert fitted.hparams["features"] == best == res["features"]
    assert fitted.head.net[0].in_features == model.feature_size(best)
