"""GWCorrection / GWCalc plumbing: model loading, refusal without a trained head, ASE API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ase_mlks.core.errors import CheckpointError
from ase_mlks.gw import GWCalc, GWCorrection, GWModel, HeadNotTrainedError

SHIPPED = Path(__file__).resolve().parent.parent / "ase_mlks" / "pretrained" / "gw-c2d-pbe.pt"


def small_model(trained: bool) -> GWModel:
    torch.manual_seed(0)
    m = GWModel(vae=dict(channels=8), super_vae=dict(channels=8), density_vae=dict(channels=8))
    m.head_trained.fill_(trained)
    return m.eval()


def test_untrained_head_refuses():
    gw = GWCorrection(small_model(trained=False))
    with pytest.raises(HeadNotTrainedError, match="not been trained"):
        gw.corrections(calc=None)


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="no model file"):
        GWCorrection("no-such-gw-model")


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped model not built yet")
def test_shipped_model_loads_by_name():
    gw = GWCorrection("c2d-pbe")
    assert gw.model.hparams["nz"] == 40
    meta = gw.model.checkpoint_meta
    assert "vae_training" in meta["extra"]


@pytest.fixture(scope="module")
def mos2_calc():
    pytest.importorskip("gpaw")
    from gpaw import GPAW, PW

    from ase_mlks.gw.data import build_monolayer

    atoms = build_monolayer("MoS2")
    atoms.calc = GPAW(mode=PW(200), xc="PBE", kpts={"size": (3, 3, 1), "gamma": True},
                      convergence={"density": 1e-4}, txt=None)
    atoms.get_potential_energy()
    return atoms.calc


@pytest.mark.slow
@pytest.mark.gpaw
def test_plumbing_on_gpaw(mos2_calc):
    """Untrained random head: checks shapes and identities only, no accuracy."""
    gw = GWCorrection(small_model(trained=True))
    bands = (10, 16)
    sigma = gw.corrections(mos2_calc, bands)
    nk = len(mos2_calc.get_ibz_k_points())
    assert sigma.shape == (1, nk, 6)
    qp = gw.quasiparticle_energies(mos2_calc, bands)
    eps = np.array([mos2_calc.get_eigenvalues(kpt=k)[10:16] for k in range(nk)])
    assert np.allclose(qp[0] - eps, sigma[0], atol=1e-5)
    calc = GWCalc(dft=mos2_calc, model=gw.model, bands=bands)
    assert np.allclose(calc.get_eigenvalues(kpt=1), qp[0, 1])
    assert calc.get_number_of_bands() == 6
    bs = gw.band_structure(mos2_calc, path="GMKG", npoints=12, bands=bands)
    assert bs.energies.shape == (1, 12, 6)
    assert np.allclose(bs.path.kpts[0], 0)
    assert {"band_structure_s", "path_dft_s", "predict_s"} <= set(gw.timings)


def test_state_only_head_needs_no_context_run():
    """A head on KS states and energies alone must not start the context DFT run."""
    torch.manual_seed(0)
    m = GWModel(vae=dict(channels=8), super_vae=dict(channels=8), density_vae=dict(channels=8),
                features="state")
    gw = GWCorrection(m.eval())

    def forbidden(calc):
        raise AssertionError("context DFT run started")

    gw.context_calculator = forbidden
    assert not m.uses_context and small_model(True).uses_context
    ctx = gw.material_context(calc=object())
    feats = m.features(torch.rand(3, m.state_vae.latent), torch.zeros(3), ctx)
    assert feats.shape == (3, m.state_vae.latent + 1)
