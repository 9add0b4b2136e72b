"""DPWannierTrainer (two stages, resume, checkpoint) and DPWannierCalc (ASE API, bands,
errors) on a small data set labelled by a fixed random 'teacher' DPWannierModel — a known
target the student must learn, not a stand-in for the GPAW data (that is benchmarks/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.dft.kpoints import BandPath
from ase.optimize import BFGS

from ase_mlks.core.dataset import StructureDataset
from ase_mlks.core.errors import StructureError, UnknownElementError
from ase_mlks.dpwannier import DPWannierCalc, DPWannierModel, DPWannierTrainer
from ase_mlks.structures import bilayer_configuration, monolayer

SMALL = dict(embed=[8, 16], axis=4, fit=[16, 8], h_cutoff=7.0, env_channels=2, n_radial=8,
             intra_hidden=[16], inter_hidden=[8], onsite_hidden=[16])


def _teacher() -> DPWannierModel:
    torch.manual_seed(42)
    t = DPWannierModel(**SMALL).double()
    t.e_bias.copy_(torch.tensor([-10.0, -5.0], dtype=torch.float64))
    t.onsite_bias[0, :5] = -4.0
    t.onsite_bias[1, :3] = -7.0
    t.min_distance = 1.5
    with torch.no_grad():
        for head in t.heads.values():  # heads start at zero output: give them weights
            torch.nn.init.normal_(head[-1].weight, std=0.3)
            torch.nn.init.normal_(head[-1].bias, std=0.3)
    return t


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpw") / "teacher.h5"
    calc = DPWannierCalc(model=_teacher())
    rng = np.random.default_rng(0)
    with StructureDataset(path) as ds:
        for n in range(10):
            atoms = bilayer_configuration(rng, size=(2, 2), rattle_std=0.05)
            calc.reset()
            e = calc.get_potential_energy(atoms)
            f = calc.get_forces(atoms)
            ham = calc.get_hamiltonian(atoms)
            ds.append(f"mos2_2x2_{n:03d}", atoms, energy=np.array(e), forces=f,
                      writer=lambda g, h=ham: h.to_hdf5(g.create_group("wannier")))
    return path


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    tr = DPWannierTrainer(dataset, work, model_kwargs=SMALL, progress=False)
    h1 = tr.stage1(epochs=4, lr=5e-3, batch_size=2)
    h2 = tr.stage2(epochs=4, lr=5e-3, batch_size=2)
    out = work / "model.pt"
    info = tr.finish(out)
    return dict(trainer=tr, h1=h1, h2=h2, path=out, info=info, work=work, data=dataset)


def test_two_stage_training_learns_and_freezes(trained):
    h1, h2 = trained["h1"], trained["h2"]
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]
    assert h2[-1]["train_loss"] < h2[0]["train_loss"]
    tr = trained["trainer"]
    assert len(tr.train_keys) + len(tr.val_keys) == 10 and tr.val_keys
    # stage 2 must not have changed the force field: compare with stage 1's best weights
    ff = torch.load(trained["work"] / "stage1" / "best.pt", weights_only=False)["state_dict"]
    sd = tr.model.state_dict()
    for k, v in ff.items():
        if k.startswith(("descriptor.", "fit_hidden.", "fit_out.")):
            assert torch.equal(v, sd[k].to(v.dtype)), k
    assert "h_mae_meV" in trained["info"]["val"]
    assert trained["info"]["alignment"]["fitted"]


def test_training_resumes(trained):
    tr = DPWannierTrainer(trained["data"], trained["work"], model_kwargs=SMALL, progress=False)
    hist = tr.stage1(epochs=5, lr=5e-3, batch_size=2)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]


def test_same_seed_reproduces_a_run_and_another_seed_does_not(dataset, tmp_path):
    """--seed fixes the initial weights as well as the batch order: two fresh runs with the
    same seed end with identical weights, a different seed starts from other weights."""
    def run(name: str, seed: int) -> tuple[dict, dict]:
        torch.manual_seed(1000 + seed + len(name))  # whatever the global RNG held before
        tr = DPWannierTrainer(dataset, tmp_path / name, model_kwargs=SMALL, progress=False,
                              seed=seed)
        start = {k: v.clone() for k, v in tr.model.state_dict().items()}
        tr.stage1(epochs=2, lr=5e-3, batch_size=2)
        return start, tr.model.state_dict()

    start_a, end_a = run("a", 0)
    start_b, end_b = run("bb", 0)
    start_c, _ = run("c", 1)
    assert all(torch.equal(v, end_b[k]) for k, v in end_a.items())
    assert all(torch.equal(v, start_b[k]) for k, v in start_a.items())
    assert not all(torch.equal(v, start_c[k]) for k, v in start_a.items())


def test_lbfgs_stage_and_new_heads_on_a_trained_force_field(trained, tmp_path):
    """Full-batch L-BFGS stage 2 with bond invariants, starting from stage 1's force field:
    the force field is copied exactly, the new heads learn, a mismatched FF is refused."""
    from ase_mlks.core.errors import CheckpointError

    best = trained["work"] / "stage1" / "best.pt"
    kw = {**SMALL, "bond_invariants": True}
    tr = DPWannierTrainer(trained["data"], tmp_path / "new", model_kwargs=kw, progress=False,
                          init_ff=best)
    ff = torch.load(best, weights_only=False)["state_dict"]
    sd = tr.model.state_dict()
    for k, v in ff.items():
        if k.startswith(("descriptor.", "fit_hidden.", "fit_out.", "d_mean", "d_std")):
            assert torch.equal(v, sd[k].to(v.dtype)), k
    hist = tr.stage2(epochs=2, optimizer="lbfgs", loss_weights={"w_bands": 0.1})
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    with pytest.raises(CheckpointError, match="force field differs"):
        DPWannierTrainer(trained["data"], tmp_path / "bad", model_kwargs={**SMALL, "axis": 2},
                         progress=False, init_ff=best)
    # fine-tuning starts from the complete saved model; a different architecture is refused
    tuned = DPWannierTrainer(trained["data"], tmp_path / "tune", model_kwargs=SMALL,
                             progress=False, init_model=trained["path"])
    saved = torch.load(trained["path"], weights_only=False)["state_dict"]
    for k, v in tuned.model.state_dict().items():
        assert torch.equal(v, saved[k].to(v.dtype)), k
    with pytest.raises(CheckpointError, match="does not fit"):
        DPWannierTrainer(trained["data"], tmp_path / "bad2", model_kwargs=kw, progress=False,
                         init_model=trained["path"])


def test_init_model_grows_into_wider_heads(trained, tmp_path):
    """``init_model`` with wider heads in model_kwargs starts from the saved model's exact
    predictions (stage 2 then trains the wider heads); narrower heads are refused."""
    from ase_mlks.core.errors import CheckpointError

    wide = {**SMALL, "intra_hidden": [24], "inter_hidden": [12]}
    tr = DPWannierTrainer(trained["data"], tmp_path / "wide", model_kwargs=wide,
                          progress=False, init_model=trained["path"])
    assert tr.model.heads["intra_0_1_short"][0].weight.shape[0] == 24
    atoms = bilayer_configuration(np.random.default_rng(1), size=(2, 2))
    h_saved = DPWannierCalc(model=str(trained["path"])).get_hamiltonian(atoms)
    h_grown = DPWannierCalc(model=tr.model).get_hamiltonian(atoms)
    k = np.array([[0.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    np.testing.assert_allclose(h_grown.eigenvalues(k), h_saved.eigenvalues(k), atol=1e-5)
    with pytest.raises(CheckpointError, match="narrower"):
        DPWannierTrainer(trained["data"], tmp_path / "narrow",
                         model_kwargs={**SMALL, "intra_hidden": [8]}, progress=False,
                         init_model=trained["path"])


def test_energy_correction_improves_forces_and_keeps_the_heads(trained, tmp_path):
    """A trained model grown with ff_correction starts at exactly its predictions; stage 1
    with correction_only lowers the force loss, changes no base force-field or head weight
    (so the RAER and every H block stay as they were) and is saved as a complete model."""
    from ase_mlks.core.errors import AseMlksError
    from ase_mlks.dpwannier.trainer import main

    kw = {**SMALL, "ff_correction": True, "correction_embed": [8, 16], "correction_axis": 4,
          "correction_fit": [16], "correction_species_stats": True}
    tr = DPWannierTrainer(trained["data"], tmp_path / "corr", model_kwargs=kw, progress=False,
                          init_model=trained["path"])
    saved = torch.load(trained["path"], weights_only=False)["state_dict"]
    sd = tr.model.state_dict()
    assert all(torch.equal(v, sd[k].to(v.dtype)) for k, v in saved.items())
    hist = tr.stage1(epochs=3, lr=5e-3, batch_size=2, correction_only=True)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    sd = tr.model.state_dict()
    for k, v in saved.items():  # nothing outside the correction moved
        assert torch.equal(v, sd[k].to(v.dtype)), k
    with pytest.raises(AseMlksError, match="ff_correction"):
        trained["trainer"].stage1(epochs=1, correction_only=True)
    out = tmp_path / "corrected.pt"
    main(["--data", str(trained["data"]), "--workdir", str(tmp_path / "cli"), "--stage", "1",
          "--epochs1", "2", "--optimizer1", "adam", "--lr1", "5e-3", "--batch-size", "2",
          "--correction-only", "--init-model", str(trained["path"]), "--output", str(out),
          "--model-kwargs", json.dumps(kw)])
    calc = DPWannierCalc(model=str(out))
    assert calc.model.correction is not None


def test_shell_normalized_element_loss(dataset):
    """Per-shell normalized element loss: 0 for the teacher that made the data; exactly 1
    (1 - R² = 1 in every on-site and distance/layer group) for heads that predict nothing
    beyond the mean on-site levels."""
    from ase_mlks.dpwannier.data import DPWannierData
    from ase_mlks.dpwannier.trainer import hamiltonian_loss

    teacher = _teacher()
    with StructureDataset(dataset, "r") as ds:
        keys = ds.keys()[:2]
    sample = DPWannierData(dataset, keys, teacher)[0]
    shells = (2.6, 3.5, 4.5, 6.0)
    exact, _ = hamiltonian_loss(teacher, sample, w_bands=0.0, shells=shells)
    assert float(exact.detach()) < 1e-6
    blank = _teacher()
    with torch.no_grad():
        for head in blank.heads.values():
            head[-1].weight.zero_()
            head[-1].bias.zero_()
    nothing, _ = hamiltonian_loss(blank, sample, w_bands=0.0, shells=shells)
    assert float(nothing.detach()) == pytest.approx(1.0, abs=1e-3)
    # w_onsite = 3 raises the on-site group's ~1 to ~3 among n groups: mean ~1 + 2/n
    weighted, _ = hamiltonian_loss(blank, sample, w_bands=0.0, shells=shells, w_onsite=3.0)
    n_groups = 2.0 / (float(weighted.detach()) - 1.0)
    assert n_groups >= 2 and n_groups == pytest.approx(round(n_groups), abs=0.05)
    plain, _ = hamiltonian_loss(blank, sample, w_bands=0.0)
    # a different objective from the plain MSE
    assert float(plain.detach()) != pytest.approx(float(nothing.detach()), abs=1e-3)


def test_fine_tuning_on_compressed_cells_widens_the_accepted_range(trained, tmp_path):
    """New data that come closer than the old model's (strained cells) lower min_distance;
    the calculator then accepts them instead of refusing its own training structures."""
    old = torch.load(trained["path"], weights_only=False)["hparams"]["min_distance"]
    calc = DPWannierCalc(model=_teacher())
    path = tmp_path / "compressed.h5"
    with StructureDataset(path) as ds:
        for n in range(3):
            atoms = bilayer_configuration(np.random.default_rng([9, n]), size=(2, 2),
                                          rattle_std=0.05, strain=0.08)
            atoms.set_cell(atoms.cell[:] * [0.85, 0.85, 1.0], scale_atoms=True)
            calc.reset()
            ds.append(f"c{n}", atoms, energy=np.array(calc.get_potential_energy(atoms)),
                      forces=calc.get_forces(atoms))
    tuned = DPWannierTrainer(path, tmp_path / "tune", model_kwargs=SMALL, progress=False,
                             init_model=trained["path"], val_fraction=0.0)
    closest = min(float(_distances(atoms).min()) for atoms in _records(path))
    assert tuned.model.min_distance < old
    assert tuned.model.min_distance == pytest.approx(0.85 * closest, abs=1e-3)


def test_stage1_leaves_out_coarsely_sampled_references(dataset, tmp_path, capsys):
    """Records whose reference k-grid is much coarser than the rest (Γ-only twisted cells
    beside 3x3-k bilayers) are another level of theory for energies and forces: stage 1
    leaves them out and says so, stage 2 and the H metrics use them, and the held-out force
    metrics skip them."""
    import shutil

    import h5py

    from ase_mlks.dpwannier.trainer import evaluate

    path = tmp_path / "mixed.h5"
    shutil.copy(dataset, path)
    with h5py.File(path, "r+") as f:
        keys = sorted(f)
        for i, k in enumerate(keys):  # the 2x2 cells are 6.4 Å: 3x3 k -> 19 Å, Γ -> 6.4 Å
            f[k].attrs["settings"] = json.dumps({"kpts": [1, 1] if i % 3 == 0 else [3, 3]})
    coarse = {k for i, k in enumerate(keys) if i % 3 == 0}
    tr = DPWannierTrainer(path, tmp_path / "run", model_kwargs=SMALL, progress=False)
    assert set(tr.coarse_keys) == coarse
    # the energy bias is fitted on the records at the force field's level only: shifting the
    # coarse records' energies changes nothing
    with h5py.File(path, "r+") as f:
        for k in coarse:
            f[k]["energy"][()] = f[k]["energy"][()] + 100.0
    shifted = DPWannierTrainer(path, tmp_path / "shifted", model_kwargs=SMALL, progress=False)
    assert torch.equal(shifted.model.e_bias, tr.model.e_bias)
    assert all(d == pytest.approx(np.linalg.norm(_records(path)[0].cell[0]))
               for d in tr.coarse_keys.values())
    t1 = tr._trainer(1, epochs=1, lr=1e-3, batch_size=2)
    assert "stage 1 leaves out 4 structures" in capsys.readouterr().out
    used1 = set(t1.train_set.keys) | set(t1.val_set.keys if t1.val_set else [])
    assert used1 == set(keys) - coarse
    t2 = tr._trainer(2, epochs=1, lr=1e-3, batch_size=2)
    assert set(t2.train_set.keys) | set(t2.val_set.keys if t2.val_set else []) == set(keys)
    samples = [tr.train_set[i] for i in range(len(tr.train_set))]
    full = evaluate(tr.model, samples)
    part = evaluate(tr.model, samples, no_forces=tr.coarse_keys)
    assert part["n_forces"] == len(samples) - len(coarse & set(tr.train_keys)) < full["n_forces"]
    assert part["h_elements"] == full["h_elements"]
    assert part["force_mae_meV_A"] != full["force_mae_meV_A"]
    everything = DPWannierTrainer(path, tmp_path / "all", model_kwargs=SMALL, progress=False,
                                  min_kpoint_density=None)
    assert not everything.coarse_keys


def _records(path):
    with StructureDataset(path, "r") as ds:
        return [ds.read(k)["atoms"] for k in ds.keys()]


def _distances(atoms):
    from ase.neighborlist import neighbor_list

    return neighbor_list("d", atoms, 4.0)


@pytest.fixture()
def calc(trained):
    return DPWannierCalc(model=str(trained["path"]))


def test_calculator_properties(calc):
    atoms = bilayer_configuration(np.random.default_rng(5), size=(2, 2))
    atoms.calc = calc
    e = atoms.get_potential_energy()
    assert np.isfinite(e) and atoms.get_forces().shape == (24, 3)
    assert atoms.get_stress().shape == (6,)
    assert calc.results["free_energy"] == e
    assert np.isclose(calc.results["energies"].sum(), e)
    assert calc.get_raer().shape == (24, 8)
    ham = calc.get_hamiltonian()
    assert ham.norb == 8 * 5 + 16 * 3
    assert ham.hermiticity_error() < 1e-12


def test_band_structure_paths(calc):
    atoms = bilayer_configuration(np.random.default_rng(6), size=(2, 2), rattle_probability=0)
    atoms.calc = calc
    path = atoms.cell.bandpath("GMKG", npoints=12, pbc=atoms.pbc)
    bs = calc.band_structure(path=path)
    assert bs.energies.shape == (1, 12, 88)
    explicit = BandPath(atoms.cell, kpts=np.array([[0, 0, 0], [0.5, 0, 0], [1 / 3, 1 / 3, 0]]))
    bs2 = calc.band_structure(path=explicit)
    assert np.allclose(bs2.energies[0, 0], bs.energies[0, 0])
    ef = calc.get_fermi_level()
    assert bs.energies.min() < ef < bs.energies.max()
    calc.set(kpts=path)
    assert np.allclose(calc.get_eigenvalues(kpt=0), bs.energies[0, 0])


def test_monolayer_and_relaxation(calc):
    mono = monolayer("MoS2", size=(2, 2))
    mono.rattle(0.03, seed=1)
    mono.calc = calc
    e0 = mono.get_potential_energy()
    assert calc.get_hamiltonian().norb == 4 * 11
    opt = BFGS(mono, logfile=None)
    opt.run(fmax=0.05, steps=5)
    assert mono.get_potential_energy() <= e0 + 1e-9


def test_clear_errors(calc):
    atoms = bilayer_configuration(np.random.default_rng(7), size=(2, 2))
    bad = atoms.copy()
    bad.numbers[0] = 74  # W
    with pytest.raises(UnknownElementError, match="W"):
        calc.get_potential_energy(bad)
    flat = atoms.copy()
    flat.pbc = False
    with pytest.raises(StructureError, match="periodic"):
        calc.get_potential_energy(flat)
    close = atoms.copy()
    close.positions[1] = close.positions[0] + [0.5, 0, 0]
    with pytest.raises(StructureError, match="apart"):
        calc.get_potential_energy(close)


def test_torch_bloch_eigenvalues_match_tbhamiltonian(calc):
    """The differentiable band energies of stage 2 equal the core's Bloch sums."""
    atoms = bilayer_configuration(np.random.default_rng(8), size=(2, 2))
    ham = calc.get_hamiltonian(atoms)
    kpts = np.array([[0.0, 0.0, 0.0], [1 / 3, 1 / 3, 0.0], [0.2, -0.1, 0.0]])
    g = calc.graph(atoms)
    with torch.no_grad():
        out = calc.model(g, forces=False, hamiltonian=True)
        eps = calc.model.bloch_eigenvalues(g, out["onsite"], out["hop"], 0, torch.as_tensor(kpts))
    assert np.allclose(eps.numpy(), ham.eigenvalues(kpts), atol=1e-8)


def test_large_cell_solver_matches_dense(calc):
    """Shift-invert with the dense LU (used above 3000 orbitals) = dense eigh near sigma."""
    from ase_mlks.dpwannier.calculator import eigenvalues_near

    atoms = bilayer_configuration(np.random.default_rng(9), size=(2, 2))
    ham = calc.get_hamiltonian(atoms)
    kpts = np.array([[0.0, 0.0, 0.0], [0.25, 0.1, 0.0]])
    sigma = float(np.median(ham.eigenvalues(kpts[:1])))
    ref = ham.eigenvalues(kpts, nbands=10, sigma=sigma, solver="dense")
    assert np.allclose(eigenvalues_near(ham, kpts, 10, sigma), ref, atol=1e-8)


def test_shipped_model_knows_strained_layers():
    """A held-out GPAW bilayer strained biaxially by -5.9 % (the compressed layers of the
    near-commensurate cells): measured (session 6) energy error 8.8 meV/atom, force MAE
    113 meV/Å (reference RMS 1.6 eV/Å); the model trained without strained cells gave
    893 meV/atom and 588 meV/Å and collapsed those cells in relaxations."""
    from pathlib import Path

    with StructureDataset(Path(__file__).parent / "data" / "mos2_bilayer_strained.h5",
                          "r") as ds:
        rec = ds.read("bs00009")
    calc = DPWannierCalc(model="mos2-bilayer")
    assert "bs:bs00009" in calc.model.checkpoint_meta["extra"]["val_keys"]  # really unseen
    atoms = rec["atoms"]
    e = calc.get_potential_energy(atoms)
    assert abs(e - float(rec["energy"])) / len(atoms) < 0.03
    assert np.abs(calc.get_forces(atoms) - rec["forces"]).mean() < 0.25


@pytest.mark.parametrize("fixture, key, interlayer, scanned", [
    ("mos2_twisted_1_2.h5", "twisted_MoS2_1_2", True, "mos2_twisted_kconv.h5"),
    ("mos2_twisted_1_2_aap.h5", "twisted_MoS2_1_2_AAp", True, "mos2_twisted_kconv.h5"),
    # GPAW's BFGS met its per-atom fmax with 0.35 eV/Å still on each layer: its end point's
    # interlayer distance is not converged (docs/reference.md); the scan's zero is
    ("mos2_twisted_2_3.h5", "twisted_MoS2_2_3", False, "mos2_twisted_2_3.h5")])
def test_shipped_model_relaxes_the_twisted_cell_like_gpaw(fixture, key, interlayer, scanned):
    """The shipped model's BFGS minimum of the unseen twisted cells vs GPAW's (LCAO dzp
    PBE + D3, Γ only, fmax 0.03 eV/Å). Measured on the 21.79° AA-type: interlayer Mo-Mo
    6.354 vs 6.325 Å, RMSD 0.018 Å (session 6; session 5's model: 6.378 Å, 0.027 Å; session
    13: 6.317 Å, 0.009 Å); the bounds are about 2-3x that, to catch a regressed force field.
    Each layer's shape (RMSD with each layer's mean displacement removed), session 20:
    0.009 / 0.010 / 0.022 Å on the 21.79° AA, AA' and 13.17° cells.

    The interlayer distance is also compared with the zero of GPAW's net interlayer force
    on the finer h = 0.15 Å grid (a rigid scan of GPAW's relaxed layers, stored in the
    record by ``benchmarks/reference_interlayer_scan.py --store``; on the data's h = 0.2 Å
    grid the layer forces carry a grid error that moves the zero inwards by 0.04-0.05 Å).
    Session 21: model 6.317 / 6.319 / 6.306 Å, GPAW 6.306 / 6.307 / 6.263 Å; same bound."""
    from pathlib import Path

    from ase_mlks.core.graph import assign_layers, interlayer_distance
    from ase_mlks.reference.relax import scan_attribute

    data = Path(__file__).parent / "data"
    with StructureDataset(data / fixture, "r") as ds:
        rec = ds.read(key)
    if "relaxed_positions" not in rec:
        pytest.skip("fixture has no GPAW relaxation")
    with StructureDataset(data / scanned, "r") as ds:
        scan = json.loads(ds.group(key).attrs[scan_attribute(0.15)])
    atoms = rec["atoms"]
    atoms.calc = DPWannierCalc(model="mos2-bilayer")
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=200)
    gpaw = atoms.copy()
    gpaw.positions = rec["relaxed_positions"]

    assert abs(interlayer_distance(atoms) - scan["zero_force_mo_mo"]) < 0.1
    d = atoms.positions - gpaw.positions
    if interlayer:
        assert abs(interlayer_distance(atoms) - interlayer_distance(gpaw)) < 0.1
        d -= d.mean(axis=0)
        assert np.sqrt((d ** 2).sum(axis=1).mean()) < 0.06
    layer = assign_layers(atoms)
    for k in np.unique(layer):
        d[layer == k] -= d[layer == k].mean(axis=0)
    assert np.sqrt((d ** 2).sum(axis=1).mean()) < 0.05


@pytest.mark.parametrize("fixture, key", [("mos2_twisted_1_2.h5", "twisted_MoS2_1_2"),
                                          ("mos2_twisted_1_2_aap.h5", "twisted_MoS2_1_2_AAp"),
                                          ("mos2_twisted_2_3.h5", "twisted_MoS2_2_3")])
def test_shipped_model_hamiltonian_of_the_unseen_twisted_cells(fixture, key):
    """H-element MAE (|H| > 1 meV; pairs inside the Wigner-Seitz radius of the reference's
    2x2 Wannier grid) on the unseen twisted cells (21.79 degree AA- and 2H-type, 13.17
    degree). Measured (session 20): 2.64 / 2.72 / 2.26 meV; session 19's heads 3.38 / 3.79 /
    2.53 (the bound fails them on the 2H-type cell), session 9's ~25 meV."""
    import json
    from pathlib import Path

    import h5py

    from ase_mlks.core.hamiltonian import TBHamiltonian
    from ase_mlks.dpwannier.trainer import wannier_h_errors

    path = Path(__file__).parent / "data" / fixture
    with StructureDataset(path, "r") as ds:
        atoms = ds.read(key)["atoms"]
    with h5py.File(path, "r") as f:
        ham = TBHamiltonian.from_hdf5(f[key]["wannier"])
        grid = json.loads(f[key]["wannier"].attrs["grid"])
    calc = DPWannierCalc(model="mos2-bilayer")
    err = wannier_h_errors(calc.model, calc.graph(atoms), ham, grid)
    assert err["h_elements"] > 40 * len(atoms) * 8  # the comparison covers the near pairs
    assert err["h_mae_meV"] < 3.5


@pytest.mark.parametrize("fixture, key", [("mos2_twisted_1_2.h5", "twisted_MoS2_1_2"),
                                          ("mos2_twisted_1_2_aap.h5", "twisted_MoS2_1_2_AAp")])
def test_shipped_model_bands_of_the_unseen_twisted_cell(fixture, key):
    """Band edges (4 valence + 4 conduction bands on Γ-M-K-Γ) of the unseen 21.79 degree cells
    (42 atoms; AA- and 2H-type) vs GPAW's. Measured on the AA-type (session 10: bond products,
    inter-layer heads that see the environment): MAE 20.5 meV, gap error -14 meV; with bond
    products only 69 / +64 meV, every earlier model 225-281 meV (session 9: 225, gap +86), so
    the bounds catch either step being lost. 2H-type (session 18): MAE 29.2, gap -14 meV.
    Session 19 (wider, annealed heads): AA 20.4 / -10, 2H-type 28.8 / -7 meV; shipped since
    session 20 (heads also trained on twisted cells): 18.4 / -15 and 19.8 / -9 meV."""
    from pathlib import Path

    with StructureDataset(Path(__file__).parent / "data" / fixture, "r") as ds:
        rec = ds.read(key)
    calc = DPWannierCalc(model="mos2-bilayer")
    ham = calc.get_hamiltonian(rec["atoms"])
    ref = rec["gpaw_bands"]
    nv = ref.shape[1] // 2
    nocc = int(round(ham.nelectrons / 2))
    mine = ham.eigenvalues(rec["path_kpts"])[:, nocc - nv:nocc - nv + ref.shape[1]]
    assert np.abs(mine - ref).mean() < 0.045
    gap = mine[:, nv:].min() - mine[:, :nv].max()
    assert abs(gap - (ref[:, nv:].min() - ref[:, :nv].max())) < 0.045
