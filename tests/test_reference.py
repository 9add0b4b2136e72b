"""Reference pipeline: Wannier construction maths, resumable HDF5 runner, bad input.

These tests need no GPAW run; test_reference_gpaw.py runs GPAW itself.
"""

import h5py
import numpy as np
import pytest
from ase.calculators.emt import EMT

from ase_mlks.core.dataset import StructureDataset
from ase_mlks.core.errors import StructureError
from ase_mlks.reference.groundstate import check_slab
from ase_mlks.reference.pipeline import (
    RecordOptions,
    compute_slab_record,
    existing_keys,
    run_dataset,
    wrap_like_gpaw,
)
from ase_mlks.reference.settings import DEFAULT, gpts_for
from ase_mlks.reference.wannier import BlochData, fourier_ws, wannier_hk
from ase_mlks.structures import bilayer, monolayer


def random_short_range_model(rng, norb=3, reach=1):
    """A Hermitian H(R) on a 2D hexagonal lattice with hoppings up to |R_i| <= reach."""
    R = [(i, j, 0) for i in range(-reach, reach + 1) for j in range(-reach, reach + 1)]
    H = {}
    for r in R:
        if r in H:
            continue
        block = rng.normal(size=(norb, norb)) * 0.5
        mr = tuple(-x for x in r)
        if r == mr:
            block = 0.5 * (block + block.T)
        H[r] = block
        H[mr] = block.T
    return np.array(list(H)), np.array(list(H.values()))


def bloch(R, H, k):
    return np.einsum("r,rab->ab", np.exp(2j * np.pi * R @ k), H)


def test_fourier_ws_exact_for_short_range_model():
    rng = np.random.default_rng(0)
    R, H = random_short_range_model(rng)
    cell = np.array([[3.0, 0, 0], [-1.5, 3.0 * np.sqrt(3) / 2, 0], [0, 0, 20.0]])
    pos = np.array([[0, 0, 10.0], [1.5, 0.87, 11.5], [1.5, 0.87, 8.5]])
    n = 6
    kpts = np.array([(i / n, j / n, 0) for i in range(n) for j in range(n)])
    Hk = np.array([bloch(R, H, k) for k in kpts])
    R2, H2 = fourier_ws(kpts, Hk, (n, n, 1), cell, pos)
    # off-grid points: a range-1 model is reproduced exactly by a 6x6 grid
    for k in rng.uniform(-0.5, 0.5, size=(5, 3)) * [1, 1, 0]:
        assert np.allclose(bloch(R2, H2, k), bloch(R, H, k), atol=1e-10)
    # Hermiticity H(-R) = H(R)^dagger
    lookup = {tuple(r): i for i, r in enumerate(R2)}
    for i, r in enumerate(R2):
        j = lookup[tuple(-r)]
        assert np.allclose(H2[j], H2[i].conj().T, atol=1e-12)


def test_fourier_ws_assigns_elements_to_nearest_image():
    # a single orbital pair at distance 1 Å along x, coupled only between nearest images
    cell = np.diag([4.0, 4.0, 20.0])
    pos = np.array([[0.0, 0, 10], [1.0, 0, 10]])
    R = np.array([[0, 0, 0]])
    H = np.array([[[0.0, -1.0], [-1.0, 0.0]]])
    n = 4
    kpts = np.array([(i / n, j / n, 0) for i in range(n) for j in range(n)])
    Hk = np.array([bloch(R, H, k) for k in kpts])
    R2, H2 = fourier_ws(kpts, Hk, (n, n, 1), cell, pos)
    big = [tuple(r) for r, h in zip(R2, H2) if np.abs(h).max() > 1e-12]
    assert big == [(0, 0, 0)]


def test_wannier_hk_lowdin_reproduces_bands():
    """All bands selected, all orbitals projected: H_W(k) has the exact eigenvalues."""
    rng = np.random.default_rng(1)
    nM, nk = 6, 4
    kpts, eigs, Cs, Ss, Hs = [], [], [], [], []
    for q in range(nk):
        X = rng.normal(size=(nM, nM)) + 1j * rng.normal(size=(nM, nM))
        S = np.eye(nM) + 0.1 * (X @ X.conj().T) / nM
        Y = rng.normal(size=(nM, nM)) + 1j * rng.normal(size=(nM, nM))
        Hm = Y + Y.conj().T
        import scipy.linalg

        e, v = scipy.linalg.eigh(Hm, S)
        kpts.append([q / nk, 0, 0])
        eigs.append(e)
        Cs.append(v.T)  # psi_n = sum_M C[n, M] phi_M
        Ss.append(S)
        Hs.append(Hm)
    data = BlochData(np.array(kpts), np.array(eigs), np.array(Cs), np.array(Ss), (nk, 1, 1))
    Hk, selected, smin = wannier_hk(data, np.arange(nM))
    for q in range(nk):
        assert np.allclose(np.linalg.eigvalsh(Hk[q]), eigs[q], atol=1e-10)
        # Löwdin orbitals S^-1/2 phi: the Wannier matrix is S^-1/2 H S^-1/2 itself
        w, V = np.linalg.eigh(Ss[q])
        s_half = V @ np.diag(w**-0.5) @ V.conj().T
        assert np.allclose(Hk[q], s_half @ Hs[q] @ s_half, atol=1e-10)
    assert smin > 0.5  # A^dag A = S here: singular values are sqrt of S eigenvalues


def test_window_selection_needs_enough_bands():
    data = BlochData(np.zeros((1, 3)), np.array([[-5.0, 0.0, 5.0]]), np.eye(3)[None],
                     np.eye(3)[None], (1, 1, 1))
    with pytest.raises(ValueError, match="window"):
        wannier_hk(data, np.arange(2), selection=(-1.0, 1.0))
    Hk, sel, _ = wannier_hk(data, np.arange(2), selection=(-6.0, 1.0))
    assert list(sel[0]) == [0, 1]
    assert np.allclose(np.linalg.eigvalsh(Hk[0]), [-5.0, 0.0])


def test_gpts_are_multiples_of_four():
    atoms = monolayer("MoS2")
    g = gpts_for(atoms, 0.2)
    assert all(x % 4 == 0 for x in g)
    assert all(L / x <= 0.2 + 1e-12 for L, x in zip(atoms.cell.lengths(), g))


def test_check_slab_rejects_bad_input():
    atoms = monolayer("MoS2")
    check_slab(atoms)
    bad = atoms.copy()
    bad.pbc = True
    with pytest.raises(StructureError, match="pbc"):
        check_slab(bad)
    close = atoms.copy()
    close.positions[1] = close.positions[0] + [0.3, 0, 0]
    with pytest.raises(StructureError, match="too close"):
        check_slab(close)
    edge = atoms.copy()
    edge.positions[:, 2] -= 5.0
    with pytest.raises(StructureError, match="z faces"):
        check_slab(edge)


def emt_record(atoms, settings, options, txt=None):
    """A real (EMT) energy/force record: exercises the runner without GPAW."""
    a = atoms.copy()
    a.calc = EMT()
    return {"arrays": {"energy": np.array(a.get_potential_energy()),
                       "forces": a.get_forces()},
            "meta": {"cpu_time": 0.0}}


def _outside_the_cell():
    """A monolayer with one atom a lattice vector away and one 1e-10 (fractional) below the
    cell's edge: GPAW puts both inside, at fractional 0.25... and 1 - 1e-10."""
    atoms = monolayer("MoS2")
    atoms.positions[1] += atoms.cell[0]
    frac = atoms.get_scaled_positions(wrap=False)
    frac[2, 1] = -1e-10
    atoms.set_scaled_positions(frac)
    return atoms


def test_wrap_like_gpaw_puts_atoms_where_gpaw_does():
    atoms = _outside_the_cell()
    wrapped = wrap_like_gpaw(atoms)
    # GPAW's positions: ASE's fractional coordinates modulo 1 (gpaw/new/builder.py)
    expected = atoms.cell.cartesian_positions(atoms.get_scaled_positions())
    assert np.allclose(wrapped.positions, expected, atol=1e-12)
    assert np.allclose(wrapped.positions[1], atoms.positions[1] - atoms.cell[0])
    assert wrapped.get_scaled_positions(wrap=False)[2, 1] > 0.99  # Atoms.wrap leaves it
    assert np.allclose(wrapped.positions[0], atoms.positions[0])  # untouched inside


def test_wannier_record_refuses_atoms_outside_the_cell():
    """The H(R) lattice vectors refer to GPAW's wrapped positions: storing unwrapped ones
    would pair hoppings with the wrong images, silently. Refused before any GPAW run."""
    with pytest.raises(StructureError, match=r"atoms \[1, 2\] lie outside the cell"):
        compute_slab_record(_outside_the_cell(), DEFAULT, RecordOptions())


def test_run_dataset_stores_wrapped_positions(tmp_path):
    path = tmp_path / "ref.h5"
    atoms = _outside_the_cell()
    atoms.set_chemical_symbols(["Cu", "Au", "Au"])  # EMT stand-ins
    seen = []

    def compute(a, settings, options, txt=None):
        seen.append(a.positions.copy())
        return emt_record(a, settings, options, txt)

    run_dataset(path, [("s0", atoms)], DEFAULT, compute=compute, progress=False)
    with StructureDataset(path, "r") as ds:
        stored = ds.read("s0")["positions"]
    assert np.allclose(seen[0], wrap_like_gpaw(atoms).positions)
    assert np.allclose(stored, seen[0], atol=1e-5)  # float32 storage


def test_run_dataset_resumes_and_stores_metadata(tmp_path):
    path = tmp_path / "ref.h5"
    items = [(f"s{i}", bilayer("MoS2", shift=(0.1 * i, 0.0))) for i in range(3)]
    for _, a in items:  # EMT knows neither Mo nor S: use Cu/Au stand-ins of the same geometry
        a.set_chemical_symbols(["Cu" if s == "Mo" else "Au" for s in a.get_chemical_symbols()])
    new = run_dataset(path, items[:2], DEFAULT, compute=emt_record, command="test", progress=False)
    assert new == ["s0", "s1"]
    new = run_dataset(path, items, DEFAULT, compute=emt_record, command="test", progress=False)
    assert new == ["s2"]  # s0, s1 skipped
    assert existing_keys(path) == {"s0", "s1", "s2"}
    with StructureDataset(path, "r") as ds:
        rec = ds.read("s1")
        assert rec["forces"].dtype == np.float32 and rec["forces"].shape == (6, 3)
        assert "gpaw" in rec["attrs"]["versions"] and rec["attrs"]["command"] == "test"
    with h5py.File(path) as f:
        assert f["s2"].attrs["complete"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def emt_record_failing_on_s1(atoms, settings, options, txt=None):
    if atoms.info.get("name") == "s1":
        raise RuntimeError("SCF did not converge")
    return emt_record(atoms, settings, options, txt)


@pytest.mark.parametrize("workers", [1, 2])
def test_one_failed_structure_does_not_lose_the_others(tmp_path, workers):
    from ase_mlks.reference.pipeline import ReferenceFailure

    path = tmp_path / "ref.h5"
    items = []
    for i in range(4):
        a = bilayer("MoS2", shift=(0.1 * i, 0.0))
        a.set_chemical_symbols(["Cu" if s == "Mo" else "Au" for s in a.get_chemical_symbols()])
        a.info["name"] = f"s{i}"
        items.append((f"s{i}", a))
    with pytest.raises(ReferenceFailure, match="s1: RuntimeError: SCF did not converge") as err:
        run_dataset(path, items, DEFAULT, compute=emt_record_failing_on_s1, workers=workers,
                    progress=False)
    assert set(err.value.failed) == {"s1"} and sorted(err.value.stored) == ["s0", "s2", "s3"]
    assert existing_keys(path) == {"s0", "s2", "s3"}  # stored, and a rerun resumes at s1


def test_band_path_of_strained_cells_uses_the_hexagonal_special_points():
    from ase_mlks.reference.pipeline import check_path
    from ase_mlks.structures import bilayer_configuration

    plain = check_path(bilayer("MoS2", size=(2, 2)), "GMKG", 31)
    for n in range(4):
        strained = bilayer_configuration(np.random.default_rng([7, n]), strain=0.08)
        with pytest.raises(KeyError):  # ASE alone finds no K in a non-hexagonal cell
            strained.cell.bandpath("GMKG", npoints=31)
        path = check_path(strained, "GMKG", 31)
        assert np.allclose(path.kpts, plain.kpts)  # same fractional k-points
    with pytest.raises(StructureError, match="no special point"):
        check_path(bilayer("MoS2"), "GXG", 10)


def test_cli_gw_study_rejects_bad_variants(tmp_path, capsys):
    from ase_mlks.reference.__main__ import main

    pytest.importorskip("gpaw")
    work = str(tmp_path / "study")
    assert main(["gw-study", "--variants", "[1, 2]", "--workdir", work]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert main(["gw-study", "--variants", '{"x": {"omega_max": 30}}', "--workdir", work]) == 2
    assert "unknown G0W0 settings ['omega_max']" in capsys.readouterr().err


def test_cli_rejects_twist_without_commensurate_cell(tmp_path, capsys):
    from ase_mlks.reference.__main__ import main

    pytest.importorskip("gpaw")
    rc = main(["twisted", "--index", "2", "2", "--out", str(tmp_path / "x.h5")])
    assert rc == 2
    assert "no commensurate twisted cell" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_missing_gpaw_gives_clear_error(monkeypatch):
    import sys

    from ase_mlks.reference.settings import require_gpaw

    monkeypatch.setitem(sys.modules, "gpaw", None)  # makes 'import gpaw' fail
    with pytest.raises(ImportError, match="GPAW is not installed"):
        require_gpaw()


def test_disentanglement_keeps_frozen_bands_exactly():
    """Entangled bands: 3 orbitals inside a 6-band space; the frozen window's bands survive."""
    rng = np.random.default_rng(5)
    nM, norb, nk = 6, 3, 3
    kpts, eigs, Cs, Ss = [], [], [], []
    for q in range(nk):
        Y = rng.normal(size=(nM, nM)) + 1j * rng.normal(size=(nM, nM))
        e, v = np.linalg.eigh(Y + Y.conj().T)
        kpts.append([q / nk, 0, 0])
        eigs.append(e)
        Cs.append(v.T)
        Ss.append(np.eye(nM, dtype=complex))
    data = BlochData(np.array(kpts), np.array(eigs), np.array(Cs), np.array(Ss), (nk, 1, 1))
    eigs = np.array(eigs)
    lo = eigs[:, 0].min() - 1.0
    hi = eigs[:, 1].max() + 1e-9  # two lowest bands frozen at every k
    if (eigs[:, 2] <= hi).any():
        pytest.skip("random model has a third band inside the window")
    sel = {"frozen": (lo, hi), "outer": (lo, eigs.max() + 1.0)}
    Hk, _, smin = wannier_hk(data, np.arange(norb), selection=sel)
    for q in range(nk):
        w = np.linalg.eigvalsh(Hk[q])
        for e in eigs[q, :2]:
            assert np.abs(w - e).min() < 1e-10
    assert smin > 0
    with pytest.raises(ValueError, match="frozen window"):
        wannier_hk(data, np.arange(1), selection=sel)


def test_gw_convergence_study_checks_settings_and_resumes_from_its_log(tmp_path):
    import json

    from ase_mlks.reference.gw import PRESETS, convergence_study
    from ase_mlks.structures import monolayer

    atoms = monolayer("MoS2")
    with pytest.raises(ValueError, match="unknown G0W0 settings"):
        convergence_study(atoms, {"bad": {"omega_max": 30}}, tmp_path)
    with pytest.raises(ValueError, match="unknown G0W0 preset"):
        convergence_study(atoms, {"w20": {"omega2": 20}}, tmp_path, base="nope")
    # a finished variant is read back from the log, not recomputed (GPAW is never called)
    row = {"settings": PRESETS["minimal"].todict(), "gap_ks": 1.66, "gap_qp": 2.8,
           "cpu_time_gs": 1.0, "cpu_time_gw": 2.0, "qp_vbm": -1.0, "qp_cbm": 1.8}
    log = tmp_path / "study.jsonl"
    log.write_text(json.dumps({"w20": row}) + "\n")
    assert convergence_study(atoms, {"w20": {"omega2": 20}}, tmp_path, log_path=log) == \
        {"w20": row}


def _chain_overlaps(nk: int, eps: float):
    """Two delta-like orbitals per cell of a 1-D chain in a smoothly twisted Bloch gauge.

    In the orbital basis the localization matrices are exactly diag(e^{-i b.tau_a}) (zero
    spread); the eigenvector gauge of H(k) rotated by a smooth k-dependent unitary W_k
    spreads the orbitals, which the localization steps must undo.
    """
    import scipy.linalg

    from ase_mlks.reference.localize import neighbours

    cell = np.diag([3.0, 10.0, 10.0])
    tau = np.array([[0.4, 5.0, 4.0], [1.9, 5.5, 6.0]])
    kpts = np.array([[q / nk, 0.0, 0.0] for q in range(nk)])
    nb = neighbours(kpts, (nk, 1, 1), cell)
    recip = 2 * np.pi * np.linalg.inv(cell).T
    A = np.array([[0, 1], [-1, 0]], complex)
    B = np.array([[1j, 0.3], [0.3, -1j]]) - np.array([[1j, 0.3], [0.3, -1j]]).conj().T
    eigs, T, C = [], [], []
    for k in kpts:
        ph = np.exp(2j * np.pi * k[0])
        H = np.array([[0.5, -1.0 - 0.4 * ph], [-1.0 - 0.4 * ph.conjugate(), -0.5]])
        e, c = np.linalg.eigh(H)
        W = scipy.linalg.expm(eps * (np.cos(2 * np.pi * k[0]) * A + np.sin(2 * np.pi * k[0]) * B))
        eigs.append(e)
        C.append(c)  # psi_nk = sum_a c[a, n] |a k>
        T.append(c.conj().T @ W)  # |w_a k> = sum_n psi_nk T[n, a]
    Z0 = np.empty((len(nb.dirs), nk, 2, 2), complex)
    for d in range(len(nb.dirs)):
        bcart = nb.b[d] @ recip
        for q in range(nk):
            q1 = nb.next[d, q]
            # <psi_nk| e^{-i b.r} |psi_m,k+b>; between orbitals it is diag(e^{-i b.tau})
            M = C[q].conj().T @ np.diag(np.exp(-1j * tau @ bcart)) @ C[q1]
            Z0[d, q] = T[q].conj().T @ M @ T[q1]
    return Z0, nb, np.array(eigs), T, tau


def test_localization_steps_undo_a_smooth_gauge_twist():
    from ase_mlks.reference.localize import localize

    Z0, nb, eigs, T, tau = _chain_overlaps(nk=8, eps=0.6)
    untwisted, _, _, _, _ = _chain_overlaps(nk=8, eps=0.0)
    ideal = localize(untwisted, nb, steps=0)
    assert ideal.spreads_initial.max() < 1e-10  # the orbital gauge has zero spread
    res = localize(Z0, nb, steps=30)
    assert np.all(np.diff(res.spread) <= 1e-12)  # never increases
    assert res.spread[-1] < 0.05 * res.spread[0]
    assert res.spreads_final.sum() < 0.05 * res.spreads_initial.sum()
    # centres go back to the orbital positions (modulo the supercell)
    d = res.centres_final - tau
    d -= np.round(d @ np.linalg.inv(nb.large_cell)) @ nb.large_cell
    assert np.abs(d).max() < 0.05
    # the rotation stays inside the manifold: H_W(k) keeps its eigenvalues
    for q in range(8):
        U = T[q] @ res.V[q]
        assert np.allclose(U.conj().T @ U, np.eye(2), atol=1e-10)
        assert np.allclose(np.linalg.eigvalsh(U.conj().T @ np.diag(eigs[q]) @ U), eigs[q])


def test_monolayer_items_are_distorted_and_reproducible_per_index():
    from ase_mlks.reference.pipeline import monolayer_items
    from ase_mlks.structures import monolayer

    ideal = monolayer("MoS2")
    items = dict(monolayer_items("MoS2", 0, 3, seed=0, rattle_std=0.05, strain=0.03))
    assert list(items) == [f"monolayer_MoS2_{i:05d}" for i in range(3)]
    again = dict(monolayer_items("MoS2", 2, 1, seed=0, rattle_std=0.05, strain=0.03))
    assert np.allclose(again["monolayer_MoS2_00002"].positions,
                       items["monolayer_MoS2_00002"].positions)
    for atoms in items.values():
        exx, eyy, exy = atoms.info["strain"]
        assert max(abs(exx), abs(eyy)) <= 0.03 * 1.25 + 1e-12 and abs(exy) <= 0.03 / 4
        assert not np.allclose(atoms.cell[:2], ideal.cell[:2])
        assert tuple(atoms.pbc) == (True, True, False)
        d = atoms.get_all_distances(mic=True)
        assert d[np.triu_indices(3, 1)].min() > 2.0  # distorted, not broken
    a, b = list(items.values())[:2]
    assert not np.allclose(a.positions, b.positions)


def _capture_run_dataset(monkeypatch) -> dict:
    """Replace pipeline.run_dataset (no GPAW run); the returned dict gets the items and
    settings the CLI handed it."""
    from ase_mlks.reference import pipeline

    seen = {}

    def capture(path, items, settings, options, **kwargs):
        seen.update(items=list(items), settings=settings)
        return []

    monkeypatch.setattr(pipeline, "run_dataset", capture)
    return seen


def test_cli_bilayer_twist_builds_twisted_configurations(tmp_path, monkeypatch):
    """`bilayer --twist M N` hands run_dataset twisted 42-atom cells, Γ-only by default."""
    from ase_mlks.reference import __main__ as cli

    pytest.importorskip("gpaw")
    seen = _capture_run_dataset(monkeypatch)
    out = str(tmp_path / "tw.h5")
    assert cli.main(["bilayer", "--twist", "1", "2", "--stacking", "AA'", "--count", "2",
                     "--prefix", "tw", "--no-wannier", "--out", out]) == 0
    keys = [k for k, _ in seen["items"]]
    assert keys == ["tw00000", "tw00001"]
    assert all(len(a) == 42 and a.info["twist"] == (1, 2) for _, a in seen["items"])
    assert tuple(seen["settings"].kpts) == (1, 1)
    assert cli.main(["bilayer", "--twist", "1", "2", "--kpts", "2", "2", "--count", "1",
                     "--no-wannier", "--out", out]) == 0
    assert tuple(seen["settings"].kpts) == (2, 2)
    assert cli.main(["bilayer", "--count", "1", "--no-wannier", "--out", out]) == 0
    assert len(seen["items"][0][1]) == 24 and tuple(seen["settings"].kpts) == (3, 3)


def test_cli_twisted_stacking_names_the_record(tmp_path, monkeypatch):
    """`twisted --stacking "AA'"` builds the 2H-type cell under its own record name; the
    AA-type keeps the name the existing fixtures use."""
    from ase_mlks.reference import __main__ as cli
    from ase_mlks.structures import twisted_bilayer

    pytest.importorskip("gpaw")
    seen = _capture_run_dataset(monkeypatch)
    out = str(tmp_path / "tw.h5")
    for stacking, key in (("AA", "twisted_MoS2_1_2"), ("AA'", "twisted_MoS2_1_2_AAp")):
        assert cli.main(["twisted", "--index", "1", "2", "--stacking", stacking,
                         "--no-wannier", "--out", out]) == 0
        [(name, atoms)] = seen["items"]
        assert name == key
        expected = twisted_bilayer("MoS2", 1, 2, stacking=stacking)
        np.testing.assert_allclose(atoms.positions, expected.positions)
        assert tuple(seen["settings"].kpts) == (1, 1)
    aa = twisted_bilayer("MoS2", 1, 2)
    assert not np.allclose(atoms.positions, aa.positions)  # a different structure
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli.main(["twisted", "--stacking", "AB", "--out", out])


@pytest.mark.parametrize("arg", ["AA'", "plain", "two words", "it's $HOME", 'say "hi"', "a'b\\c",
                                 ""])
def test_stored_command_words_split_back(arg):
    """Each quoted word of a stored command splits back into the argument it came from; a
    word whose only problem is a single quote reads as "AA'"."""
    import shlex

    from ase_mlks.reference.__main__ import shell_quote

    assert shlex.split(shell_quote(arg)) == [arg]
    if arg == "AA'":
        assert shell_quote(arg) == '"AA\'"'


def test_settings_and_options_come_back_from_a_records_json():
    """A record stores settings and options as JSON (tuples become lists); fromdict undoes
    that, so a rerun at a record's own settings is the same calculation."""
    import json

    from ase_mlks.reference.settings import LCAOSettings

    settings = DEFAULT.with_kpts((2, 2))
    assert LCAOSettings.fromdict(json.loads(settings.tojson())) == settings
    for options in (RecordOptions(), RecordOptions(wannier_kpts=None, h_threshold=1e-3)):
        assert RecordOptions.fromdict(json.loads(json.dumps(options.todict()))) == options
