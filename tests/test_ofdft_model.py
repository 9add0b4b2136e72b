"""OF-DFT networks, checkpoints, trainer and augmentation (fast, small untrained models)."""

import numpy as np
import pytest
import torch

from ase_mlks.core.errors import CheckpointError
from ase_mlks.ofdft.data import generate_dataset, get_testbed, ground_state, load_dataset
from ase_mlks.ofdft.model import ARCHITECTURES, DensityVAE, FunctionalCNN, OFDFTModel
from ase_mlks.ofdft.trainer import augment, train_functional, train_vae


def _small(name: str, seed: int = 0) -> OFDFTModel:
    tb = get_testbed(name)
    torch.manual_seed(seed)
    vae = DensityVAE(tb.shape, tb.dv, tb.length, tb.periodic, testbed=name,
                     **ARCHITECTURES[name]["vae"])
    fargs = {k: v for k, v in ARCHITECTURES[name]["functional"].items()
             if k not in ("standardize_input", "gradient_features")}
    fn = FunctionalCNN(tb.shape, tb.dv, tb.periodic, testbed=name, **fargs)
    return OFDFTModel.from_parts(vae, fn)


@pytest.mark.parametrize("name", ["gauss1d", "speckle1d", "gauss3d"])
def test_decoder_positive_and_normalized(name):
    model = _small(name)
    z = 5 * torch.randn(4, model.vae.latent_dim)  # far from the prior too
    with torch.no_grad():
        n = model.vae.decode(z)
    tb = get_testbed(name)
    assert n.shape == (4, *tb.shape)
    assert torch.all(n > 0)
    assert torch.allclose(n.flatten(1).sum(1) * tb.dv, torch.ones(4), atol=1e-5)
    mu, logvar = model.vae.encode(n)
    assert mu.shape == logvar.shape == (4, model.vae.latent_dim)


def test_energy_is_functional_plus_potential_term():
    model = _small("gauss1d")
    tb = get_testbed("gauss1d")
    z = torch.randn(3, model.vae.latent_dim)
    v = torch.as_tensor(np.stack([tb.sample(0, i) for i in range(3)]), dtype=torch.float32)
    with torch.no_grad():
        e, n = model.energy(z, v)
        expected = model.functional(n) + (v * n).sum(1) * tb.dv
    assert torch.allclose(e, expected)


def test_checkpoint_round_trip(tmp_path):
    model = _small("gauss3d", seed=3)
    model.vae.z_init.fill_(0.25)
    path = model.save(tmp_path / "m.pt")
    again = OFDFTModel.load(path)
    z = torch.randn(2, 32)
    v = torch.rand(2, 18, 18, 18)
    with torch.no_grad():
        assert torch.allclose(model.energy(z, v)[0], again.energy(z, v)[0])
    assert torch.all(again.vae.z_init == 0.25)
    assert again.hparams == model.hparams
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        OFDFTModel.load(bad)
    with pytest.raises(CheckpointError, match="shipped"):
        OFDFTModel.load("no-such-testbed")


def test_augmentation_maps_ground_states_to_ground_states():
    tb = get_testbed("gauss1d")
    v = tb.sample(0, 1)
    _, n = ground_state(tb, v)
    _, n_mirror = ground_state(tb, v[::-1].copy())
    batch = torch.as_tensor(np.stack([n, n]), dtype=torch.float32)
    out = augment(batch, tb, torch.Generator().manual_seed(1))
    # the only symmetry of the hard-wall box is the mirror: either identity or mirror image
    for row in out.numpy():
        assert np.allclose(row, n, atol=1e-6) or np.allclose(row, n_mirror, atol=1e-6)
    tb3 = get_testbed("gauss3d")
    n3 = torch.rand(2, *tb3.shape)
    a3 = augment(n3, tb3, torch.Generator().manual_seed(0))
    assert torch.allclose(a3.sum((1, 2, 3)), n3.sum((1, 2, 3)))
    assert torch.allclose(torch.sort(a3.flatten(1))[0], torch.sort(n3.flatten(1))[0])


def test_trainers_run_and_resume(tmp_path):
    tb = get_testbed("gauss1d")
    data = load_dataset(generate_dataset("gauss1d", tmp_path / "d", 20, seed=2, chunk=20,
                                         progress=False))
    vae = train_vae(tb, data, tmp_path / "vae", epochs=1, batch_size=8, progress=False)
    assert (tmp_path / "vae" / "last.pt").exists()
    assert torch.all(torch.isfinite(vae.z_init)) and torch.all(vae.z_std > 0)
    # resuming a finished run does no more epochs and gives the same weights
    again = train_vae(tb, data, tmp_path / "vae", epochs=1, batch_size=8, progress=False)
    for a, b in zip(vae.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    fn = train_functional(tb, data, tmp_path / "fn", epochs=1, batch_size=8, progress=False)
    assert fn.f_std > 0
    lines = (tmp_path / "fn" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
