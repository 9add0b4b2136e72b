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


def test_linear_skip_starts_as_the_pca_of_log_density():
    """Before training, a linear-skip VAE is exactly the whitened PCA of the coarse log n."""
    tb = get_testbed("gauss3d")
    torch.manual_seed(0)
    vae = DensityVAE(tb.shape, tb.dv, tb.length, tb.periodic, testbed="gauss3d",
                     **ARCHITECTURES["gauss3d"]["vae"]).eval()
    assert vae.linear_skip
    # smooth positive periodic fields that lie in the band the coarse grid keeps
    x = torch.linspace(0, 1, 19)[:-1]
    gx, gy, gz = torch.meshgrid(x, x, x, indexing="ij")
    gen = torch.Generator().manual_seed(1)
    c = torch.rand(60, 6, generator=gen) - 0.5
    logn = (c[:, 0, None, None, None] * torch.cos(2 * torch.pi * gx)
            + c[:, 1, None, None, None] * torch.sin(2 * torch.pi * gy)
            + c[:, 2, None, None, None] * torch.cos(2 * torch.pi * (gx + gz))
            + c[:, 3, None, None, None] * torch.sin(4 * torch.pi * gz)
            + c[:, 4, None, None, None] * torch.cos(2 * torch.pi * (gy - gz))
            + c[:, 5, None, None, None] * torch.sin(2 * torch.pi * (gx + gy + gz)))
    n = torch.exp(logn)
    n = n / (n.flatten(1).sum(1) * tb.dv).view(-1, 1, 1, 1)
    vae.init_linear_skip(n)
    with torch.no_grad():
        mu, _ = vae.encode(n)
        rec = vae.decode(mu)
    # six modes span these fields, so the 32-component PCA reconstructs them exactly ...
    assert torch.allclose(rec, n, rtol=1e-4, atol=1e-6 * float(n.max()))
    # ... and the latent vectors are whitened (unit variance over the set, zero mean)
    assert torch.allclose(mu[:, :6].std(0), torch.ones(6), atol=1e-3)
    assert torch.allclose(mu[:, :6].mean(0), torch.zeros(6), atol=1e-4)
    with pytest.raises(ValueError, match="softmax"):
        DensityVAE(tb.shape, tb.dv, tb.length, True, linear_skip=True)


def test_sine_output_decodes_band_limited_densities():
    """gauss1d decodes sqrt(n) in the box's 48 lowest sine modes: n = psi^2 is then a cosine
    series of at most 2 * 48 modes (no grid-scale roughness) whatever the weights."""
    tb = get_testbed("gauss1d")
    torch.manual_seed(2)
    vae = DensityVAE(tb.shape, tb.dv, tb.length, tb.periodic, testbed="gauss1d",
                     **ARCHITECTURES["gauss1d"]["vae"]).eval()
    with torch.no_grad():
        n = vae.decode(3 * torch.randn(3, vae.latent_dim)).double().numpy()
    x = tb.coordinates() / tb.length
    cos = np.cos(np.pi * np.outer(np.arange(2 * 48 + 1), x)).T
    for row in n:
        fit = cos @ np.linalg.lstsq(cos, row, rcond=None)[0]
        assert np.abs(fit - row).max() < 1e-4 * row.max()
    # a fine-grained random field (what a nearest-neighbour upsampling decoder makes) is not
    rough = np.random.default_rng(0).random(len(x))
    fit = cos @ np.linalg.lstsq(cos, rough, rcond=None)[0]
    assert np.abs(fit - rough).max() > 0.1


def test_hard_wall_gradient_feature_is_the_von_weizsaecker_integrand():
    """Box ground state n = 2 sin^2(pi x): |n'|^2 / n = 8 pi^2 cos^2(pi x) (central differences)."""
    tb = get_testbed("gauss1d")
    x = tb.coordinates()
    n = 2 * np.sin(np.pi * x) ** 2
    exact = 8 * np.pi**2 * np.cos(np.pi * x) ** 2
    for half_width, tol in ((1, 1e-3), (4, 1e-10)):  # 3-point (2nd order), 9-point (8th)
        fn = FunctionalCNN(tb.shape, tb.dv, tb.periodic, testbed="gauss1d", gradient_scale=1.0,
                           gradient_half_width=half_width)
        feat = fn._gradient_feature(torch.as_tensor(n).view(1, 1, -1)).numpy().ravel()
        # the mirror-image ghost points make the wide stencil exact up to the walls
        assert np.abs(feat - exact).max() < tol * exact.max()


def test_naive_density_descent_reports_divergence_and_keeps_the_last_finite_density():
    from ase_mlks.ofdft.solver import density_descent

    model = _small("speckle1d")
    tb = get_testbed("speckle1d")
    v = torch.as_tensor(np.stack([tb.sample(0, i) for i in range(2)]), dtype=torch.float32)
    e, n, _, hist = density_descent(model, v, steps=5, eta=1e-4)
    assert np.isfinite(hist).all() and torch.isfinite(e).all()
    e, n, _, hist = density_descent(model, v, steps=30, eta=1e36)  # absurd step: blows up
    assert np.isnan(hist[-1]).all()
    assert torch.isfinite(n).all() and torch.isfinite(e).all()
