"""Invariances of the crystal-VAE latent vector on real GPAW Kohn–Sham states (slow).

The same MoS2 monolayer is computed with a shifted origin, with swapped lattice vectors and
as a 2x1 supercell; mu of each state must not change. Grids are fixed by ``gpts`` so that the
shift is grid-commensurate and the supercell grid is the tiled primitive one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gpaw")

from ase_mlks.gw.data import GridSpec, build_monolayer, extract_material  # noqa: E402
from ase_mlks.gw.model import CrystalVAE  # noqa: E402
from ase_mlks.gw.trainer import scale_fields  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.gpaw]
N = 12  # in-plane grid points of the primitive cell
NZ3 = 48


def ground_state(atoms, gpts, kpts, ncells=1):
    from gpaw import GPAW, PW

    atoms = atoms.copy()
    atoms.calc = GPAW(mode=PW(200), xc="PBE", gpts=gpts, kpts={"size": kpts, "gamma": True},
                      symmetry="off", nbands=20 * ncells,
                      convergence={"bands": 16 * ncells, "density": 1e-5},
                      occupations={"name": "fermi-dirac", "width": 0.01}, txt=None)
    atoms.get_potential_energy()
    return atoms.calc


def latent(vae, calc, bands, kpt=0):
    ms = extract_material(calc, "x", bands=bands, spec=GridSpec(), with_context=False)
    x, _ = scale_fields(ms.moduli[0, kpt])
    return vae.embed(torch.from_numpy(x)).numpy(), ms.eigenvalues[0, kpt, bands]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    vae = CrystalVAE(channels=32).eval()
    atoms = build_monolayer("MoS2")
    base = ground_state(atoms, (N, N, NZ3), (1, 1, 1))
    return vae, atoms, base


def nondegenerate(eps, tol=0.02):
    d = np.abs(eps[:, None] - eps[None, :]) + np.eye(len(eps)) * 1e9
    return d.min(1) > tol


def test_origin_shift_real_states(setup):
    vae, atoms, base = setup
    bands = list(range(9, 16))
    mu0, e0 = latent(vae, base, bands)
    moved = atoms.copy()
    moved.positions += (3 / N) * atoms.cell[0] + (7 / N) * atoms.cell[1]
    mu1, e1 = latent(vae, ground_state(moved, (N, N, NZ3), (1, 1, 1)), bands)
    assert np.allclose(e0, e1, atol=1e-4)
    ok = nondegenerate(e0)
    scale = np.abs(mu0).max()
    assert np.abs(mu1 - mu0)[ok].max() < 2e-3 * scale


def test_swapped_lattice_vectors_real_states(setup):
    vae, atoms, base = setup
    bands = list(range(9, 16))
    mu0, e0 = latent(vae, base, bands)
    swapped = atoms.copy()
    swapped.set_cell(atoms.cell[[1, 0, 2]], scale_atoms=False)
    mu1, e1 = latent(vae, ground_state(swapped, (N, N, NZ3), (1, 1, 1)), bands)
    assert np.allclose(e0, e1, atol=1e-4)
    ok = nondegenerate(e0)
    assert np.abs(mu1 - mu0)[ok].max() < 2e-3 * np.abs(mu0).max()


def test_supercell_real_states(setup):
    vae, atoms, _ = setup
    prim = ground_state(atoms, (N, N, NZ3), (2, 1, 1))  # Gamma and M1 = supercell Gamma
    sup = ground_state(atoms.repeat((2, 1, 1)), (2 * N, N, NZ3), (1, 1, 1), ncells=2)
    nocc = 13
    mu_p, e_p = [], []
    for k in range(2):
        m, e = latent(vae, prim, list(range(nocc - 3, nocc + 3)), kpt=k)
        mu_p.append(m)
        e_p.append(e)
    mu_p, e_p = np.concatenate(mu_p), np.concatenate(e_p)
    sup_bands = list(range(2 * nocc - 4, 2 * nocc + 4))
    mu_s, e_s = latent(vae, sup, sup_bands)
    ok = nondegenerate(e_s) & (np.abs(e_s[:, None] - e_p[None]).min(1) < 2e-3)
    assert ok.sum() >= 3
    match = np.abs(e_s[:, None] - e_p[None]).argmin(1)
    diff = np.abs(mu_s[ok] - mu_p[match[ok]]).max()
    assert diff < 2e-3 * np.abs(mu_p).max()
