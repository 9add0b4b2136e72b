"""Crystal VAE invariances, shapes, checkpoints and data preparation of the GW post-processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ase_mlks.core.errors import CheckpointError, StructureError
from ase_mlks.gw.data import layer_center, read_material, window_z
from ase_mlks.gw.model import CrystalVAE, GWModel, orient, unorient
from ase_mlks.gw.trainer import reconstruction_metrics, scale_fields

FIXTURE = Path(__file__).parent / "data" / "gw_mos2_states.h5"
TOL = 1e-5


@pytest.fixture(scope="module")
def mos2():
    return read_material(FIXTURE, "MoS2")


@pytest.fixture(scope="module")
def states(mos2):
    x, _ = scale_fields(mos2.moduli[0].reshape(-1, *mos2.moduli.shape[-3:]))
    return torch.from_numpy(x)  # (12, 40, 14, 14): real MoS2 |psi_nk|


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return CrystalVAE(channels=24, latent=30).eval()


def test_table1_parameter_count():
    # Table 1 of the paper: 1,132,288 trainable parameters with 40 z-slices and 320 channels
    n = sum(p.numel() for p in CrystalVAE(in_channels=40, channels=320, latent=30).parameters())
    assert n == 1_132_288


def test_origin_translation_invariance(vae, states):
    mu = vae.embed(states)
    for shift in [(1, 0), (0, 5), (3, 7), (13, 13)]:
        moved = torch.roll(states, shifts=shift, dims=(2, 3))
        assert not torch.equal(moved, states)
        assert torch.allclose(vae.embed(moved), mu, atol=TOL)


def test_lattice_vector_choice_invariance(vae, states):
    mu = vae.embed(states)
    for g in range(1, 8):  # swaps and sign changes of (a1, a2) on the index grid
        assert torch.allclose(vae.embed(orient(states, g)), mu, atol=TOL)


def test_supercell_tiling_invariance(vae, states):
    mu = vae.embed(states)
    for reps in [(2, 1), (1, 3), (2, 2)]:
        assert torch.allclose(vae.embed(states.repeat(1, 1, *reps)), mu, atol=TOL)


def test_combined_operations_on_rectangular_grid(vae):
    x = torch.rand(5, 40, 12, 17, generator=torch.Generator().manual_seed(1))
    y = orient(torch.roll(x, (4, 9), (2, 3)).repeat(1, 1, 2, 1), 5)
    assert torch.allclose(vae.embed(y), vae.embed(x), atol=TOL)


def test_latent_distinguishes_states(vae, states):
    mu = vae.embed(states)
    assert torch.cdist(mu, mu)[~torch.eye(len(mu), dtype=bool)].min() > 0


def test_orient_roundtrip():
    x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    for g in range(8):
        assert torch.equal(unorient(orient(x, g), g), x)


@pytest.mark.parametrize("shape", [(14, 14), (12, 17), (30, 30), (9, 21)])
def test_decoder_output_shape(vae, shape):
    x = torch.rand(3, 40, *shape)
    rec = vae.reconstruct(x)
    assert rec.shape == x.shape
    assert float(rec.min()) >= 0 and float(rec.max()) <= 1  # sigmoid output (scaled moduli)
    out = vae(x)
    assert out.recon.shape == out.target.shape


def test_input_validation(vae):
    with pytest.raises(ValueError, match="expects"):
        vae.embed(torch.rand(2, 7, 14, 14))


def test_checkpoint_roundtrip(tmp_path, vae, states):
    path = vae.save(tmp_path / "vae.pt")
    again = CrystalVAE.load(path)
    assert torch.allclose(again.embed(states), vae.embed(states))
    model = GWModel(vae=dict(channels=8), super_vae=dict(channels=8), density_vae=dict(channels=8))
    model.feature_mean.normal_()
    p2 = model.save(tmp_path / "gw.pt")
    m2 = GWModel.load(p2)
    assert torch.equal(m2.feature_mean, model.feature_mean)
    assert not bool(m2.head_trained)


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        GWModel.load(bad)
    with pytest.raises(CheckpointError, match="no model file"):
        GWModel.load("no-such-model")


def test_gw_features_shape():
    model = GWModel(vae=dict(channels=8, latent=30), super_vae=dict(channels=8, latent=30),
                    density_vae=dict(channels=8, latent=30))
    nsup = model.nsuper
    ctx = model.context(torch.rand(nsup, 40, 14, 14), torch.linspace(-7, 7, nsup),
                        torch.rand(40, 14, 14))
    feats = model.features(torch.rand(5, 30), torch.zeros(5), ctx)
    assert feats.shape == (5, 30 + 1 + nsup * 31 + 30)
    assert model(feats).shape == (5,)


def test_norm_metric_exact_for_perfect_reconstruction(mos2):
    class Identity(CrystalVAE):
        def reconstruct(self, x):
            return x

    m = reconstruction_metrics(Identity(channels=4), mos2.moduli[0, 0])
    assert np.allclose(m["r2"], 1) and np.allclose(m["norm_ratio"], 1)


def test_fixture_is_real_mos2(mos2):
    # states are normalized KS states: the window holds most of |psi|^2 (pseudo norm < 1)
    cell = mos2.atoms.cell
    nz, n1, n2 = mos2.moduli.shape[-3:]
    dv = abs(np.linalg.det(cell[:2, :2])) * mos2.meta["window"] / (nz * n1 * n2)
    norms = (mos2.moduli.astype(np.float64) ** 2).sum(axis=(-1, -2, -3)) * dv
    assert np.all((norms > 0.5) & (norms < 1.05))
    assert abs(mos2.density.sum() * dv - mos2.nvalence) < 0.5  # 26 valence electrons
    assert mos2.super_moduli.shape[0] == len(mos2.super_energies) == 6


def test_window_z_periodic_and_centered():
    n3, c = 50, 12.5
    z = np.arange(n3) * c / n3
    grid = np.broadcast_to(np.exp(-((z - 1.0 + c / 2) % c - c / 2) ** 2), (3, 4, n3))
    out = window_z(np.ascontiguousarray(grid), c, z_center=1.0, nz=40, window=10.0)
    assert out.shape == (40, 3, 4)
    prof = out[:, 0, 0]
    assert abs(np.argmax(prof) - 19.5) <= 1  # peak in the window's middle across z = 0
    assert np.allclose(prof, prof[::-1], atol=1e-2)


def test_layer_center_wraps(mos2):
    atoms = mos2.atoms.copy()
    zc = layer_center(atoms)
    atoms.positions[:, 2] -= zc  # layer straddles z = 0 now
    atoms.wrap()
    assert min(abs(layer_center(atoms)), abs(layer_center(atoms) - atoms.cell[2, 2])) < 1e-6


def test_bad_cell_is_rejected(mos2):
    from ase_mlks.gw.data import check_slab

    atoms = mos2.atoms.copy()
    atoms.cell[2] = [1.0, 0.0, atoms.cell[2, 2]]
    with pytest.raises(StructureError, match="a3 along z"):
        check_slab(atoms)
    atoms = mos2.atoms.copy()
    atoms.pbc = False
    with pytest.raises(StructureError, match="periodic"):
        check_slab(atoms)
