"""Summaries of reference files: counts, CPU time per structure, Wannier band errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

__all__ = ["summarize", "print_summary", "extract", "cut_wannier"]


def extract(source: str | Path, keys, out: str | Path, h_threshold: float | None = None,
            h_quantum: float | None = None) -> None:
    """Copy complete records ``keys`` of ``source`` into ``out`` (written atomically).

    h_threshold: also drop Wannier H(R) elements below this (eV; on-site diagonal kept) —
    smaller fixtures; the stored band errors are recomputed for the cut H.
    h_quantum: store the Wannier H(R) values as integer multiples of this (eV; 1e-6 keeps
    them to 0.5 µeV, as float32 keeps a 4 eV element, in ~35 % less space).
    """
    import shutil

    from ..core.io import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        if out.exists():
            shutil.copyfile(out, tmp)
        with h5py.File(source, "r") as src, h5py.File(tmp, "a") as dst:
            for key in keys:
                if key not in src or not src[key].attrs.get("complete", False):
                    raise KeyError(f"no complete record {key!r} in {source}")
                if key in dst:
                    del dst[key]
                src.copy(src[key], dst, name=key)
                if (h_threshold or h_quantum) and "wannier" in dst[key]:
                    cut_wannier(dst[key], h_threshold or 0.0, quantum=h_quantum)
    if h_threshold or h_quantum:
        from ..core.io import repack_hdf5

        repack_hdf5(out)  # the replaced H(R) arrays leave free space behind


def cut_wannier(record: h5py.Group, threshold: float, quantum: float | None = None) -> None:
    """Drop |H| < ``threshold`` (eV) from a record's Wannier H(R) in place and recompute its
    band errors against the stored GPAW manifold bands (max / rms over the path, VBM, CBM).

    quantum: also (re)store the values as integer multiples of ``quantum`` eV
    (``TBHamiltonian.to_hdf5(h_quantum=)``); a stored quantum is kept otherwise.
    """
    from ..core.hamiltonian import TBHamiltonian

    grp = record["wannier"]
    old = float(grp.attrs.get("h_threshold", 0.0))
    stored_quantum = grp["h"].attrs.get("quantum")
    quantum = quantum if quantum is not None else stored_quantum
    if threshold <= old and quantum == stored_quantum:
        return
    tb = TBHamiltonian.from_hdf5(grp)
    attrs = {k: v for k, v in grp.attrs.items()
             if k not in ("labels", "norb", "format", "nelectrons")}
    r0 = int(np.flatnonzero((tb.R == 0).all(axis=1))[0])
    keep = (np.abs(tb.h) >= threshold) | ((tb.r_index == r0) & (tb.rows == tb.cols))
    cut = TBHamiltonian(tb.cell, tb.norb, tb.R, tb.r_index[keep], tb.rows[keep],
                        tb.cols[keep], tb.h[keep], orbital_atoms=tb.orbital_atoms,
                        nelectrons=tb.nelectrons, pbc=tb.pbc, labels=tb.labels)
    del record["wannier"]
    grp = record.create_group("wannier")
    cut.to_hdf5(grp, h_quantum=quantum)
    if threshold > old:
        attrs.update(h_threshold=threshold, cut_from_h_threshold=old)
    if "path_kpts" in record and "wannier_gpaw_bands" in record and tb.nelectrons:
        ref = record["wannier_gpaw_bands"][()]
        eps = cut.eigenvalues(record["path_kpts"][()])
        nocc = int(round(tb.nelectrons / 2))
        err = np.abs(eps - ref)
        attrs.update(band_error_max=float(err.max()),
                     band_error_rms=float(np.sqrt((err**2).mean())),
                     band_error_vbm=float(abs(eps[:, :nocc].max() - ref[:, :nocc].max())),
                     band_error_cbm=float(abs(eps[:, nocc:].min() - ref[:, nocc:].min())))
    for k, v in attrs.items():
        grp.attrs[k] = v


def summarize(path: str | Path) -> dict:
    """Per-file statistics (works for slab datasets and G0W0 files)."""
    out: dict = {"file": str(path), "records": 0}
    cpu, natoms, errs, gaps = [], [], {"max": [], "vbm": [], "cbm": []}, []
    settings = None
    with h5py.File(path, "r") as f:
        for key in f:
            g = f[key]
            if not g.attrs.get("complete", False):
                continue
            out["records"] += 1
            natoms.append(len(g["numbers"]))
            settings = settings or g.attrs.get("settings")
            if "cpu_time" in g.attrs:
                cpu.append(float(g.attrs["cpu_time"]))
            elif "cpu_time_gw" in g.attrs:
                cpu.append(float(g.attrs["cpu_time_gs"]) + float(g.attrs["cpu_time_gw"]))
                gaps.append((key, float(g.attrs["gap_ks"]), float(g.attrs["gap_qp"])))
            if "wannier" in g:
                w = g["wannier"].attrs
                for name in errs:
                    v = w.get(f"band_error_{name}")
                    if v is not None:
                        errs[name].append(float(v))
    out["natoms"] = sorted(set(natoms))
    out["cpu_time_mean_s"] = float(np.mean(cpu)) if cpu else None
    out["wannier_band_error_mean_eV"] = {k: float(np.mean(v)) for k, v in errs.items() if v}
    out["wannier_band_error_worst_eV"] = {k: float(np.max(v)) for k, v in errs.items() if v}
    if gaps:
        out["gaps_ks_qp_eV"] = gaps
    out["settings"] = json.loads(settings) if settings else None
    return out


def print_summary(path: str | Path) -> None:
    s = summarize(path)
    print(json.dumps(s, indent=1))
