"""benchmarks/reference_hamiltonian_noise.py: elements of translated copies are paired by
atom pair and pair vector, and the noise estimate is the one its docstring states."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "data" / "mos2_monolayer.h5"
KEY = "monolayer_MoS2"


@pytest.fixture(scope="module")
def hnoise():
    spec = importlib.util.spec_from_file_location(
        "reference_hamiltonian_noise", ROOT / "benchmarks" / "reference_hamiltonian_noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _translated_copy(tmp_path: Path, scale: float) -> Path:
    """The fixture record as a 'rerun': translated by 0.1 Å (no atom leaves the cell), its
    H(R) multiplied by ``scale``."""
    store = tmp_path / "reruns.h5"
    shutil.copyfile(FIXTURE, store)
    name = f"{KEY}_shift1"
    with h5py.File(store, "a") as f:
        f.copy(KEY, name)
        f[f"{name}/positions"][...] = f[f"{KEY}/positions"][()] + 0.1
        f[f"{name}/wannier/h"][...] = scale * f[f"{KEY}/wannier/h"][()]
    return store


def test_identical_rerun_has_zero_noise(hnoise, tmp_path):
    store = _translated_copy(tmp_path, 1.0)
    res = hnoise.score(FIXTURE, KEY, store, [f"{KEY}_shift1"], "mos2-bilayer", True)
    assert res["n_elements"] > 100 and res["n_onsite"] > 0
    assert res[f"{KEY}_shift1_vs_stored_meV"] == 0.0
    assert res["noise_one_evaluation_meV"] == 0.0
    # the model is translation invariant: the same (nonzero) error against both copies
    assert res["model_vs_stored_meV"] > 0
    assert res["model_vs_stored_meV"] == pytest.approx(res[f"model_vs_{KEY}_shift1_meV"])


def test_scaled_rerun_gives_the_stated_noise(hnoise, tmp_path):
    store = _translated_copy(tmp_path, 1.02)
    res = hnoise.score(FIXTURE, KEY, store, [f"{KEY}_shift1"], "mos2-bilayer", False)
    mean_abs = res["mean_abs_H_meV"]
    # every paired element is off by 2 %: MAE 2 % of the mean |H|, and for n = 2 the scatter
    # about the mean (1 %) times sqrt(2)
    assert res[f"{KEY}_shift1_vs_stored_meV"] == pytest.approx(0.02 * mean_abs, rel=1e-4)
    assert res["noise_one_evaluation_meV"] == pytest.approx(0.01 * np.sqrt(2) * mean_abs,
                                                            rel=1e-4)
    assert "model_vs_mean_meV" not in res


def test_interlayer_scan_finds_the_zero_of_the_interlayer_force():
    """benchmarks/reference_interlayer_scan.py: linear zero of the interlayer force between
    the scan points that bracket it (the 13.17° scan's numbers), None when none does."""
    spec = importlib.util.spec_from_file_location(
        "reference_interlayer_scan", ROOT / "benchmarks" / "reference_interlayer_scan.py")
    scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan)
    pts = [{"mo_mo": 6.293, "interlayer_force": -0.728},
           {"mo_mo": 6.193, "interlayer_force": 0.352},
           {"mo_mo": 6.243, "interlayer_force": -0.214}]
    assert scan.zero_crossing(pts) == pytest.approx(6.193 + 0.05 * 0.352 / 0.566)
    assert scan.zero_crossing(pts[1:2]) is None
    assert scan.zero_crossing([pts[1], dict(pts[2], interlayer_force=0.0)]) == pytest.approx(6.243)
    assert scan.zero_crossing([dict(p, interlayer_force=p["interlayer_force"] + 1)
                               for p in pts]) is None


def test_interlayer_scan_averages_each_shift_over_the_translations():
    """The grid-ripple mean: one point per shift, the mean of its translated evaluations,
    with the spread of the interlayer force; the zero is then taken from the means."""
    spec = importlib.util.spec_from_file_location(
        "reference_interlayer_scan", ROOT / "benchmarks" / "reference_interlayer_scan.py")
    scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan)

    def point(dz, t, force, energy):
        return {"dz": dz, "translate": t, "mo_mo": 6.3 + dz, "energy": energy,
                "fz_top": force, "fz_bottom": -force, "interlayer_force": force}

    # a ripple of +-0.1 eV/Å on a force that is zero at Mo-Mo 6.275
    pts = [point(0.0, t, -0.1 + r, -1.0) for t, r in ((0.0, 0.1), (0.1, -0.1))]
    pts += [point(-0.05, t, 0.1 + r, -1.002) for t, r in ((0.1, 0.1), (0.0, -0.1))]
    means = scan.mean_over_translations(pts)
    assert [m["dz"] for m in means] == [-0.05, 0.0]
    assert [m["n"] for m in means] == [2, 2]
    assert means[0]["interlayer_force"] == pytest.approx(0.1)
    assert means[1]["interlayer_force"] == pytest.approx(-0.1)
    assert means[1]["spread"] == pytest.approx(0.2)
    assert means[0]["energy"] == pytest.approx(-1.002)
    assert scan.zero_crossing(means) == pytest.approx(6.275)
    # untranslated points keep the names session-20 workdirs use
    assert scan.point_path(ROOT, -0.05, 0.0).name == "dz-0.050.json"
    assert scan.point_path(ROOT, 0.0, 0.0985).name == "dz+0.000_t+0.09850.json"
