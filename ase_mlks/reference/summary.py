"""Summaries of reference files: counts, CPU time per structure, Wannier band errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

__all__ = ["summarize", "print_summary", "extract"]


def extract(source: str | Path, keys, out: str | Path) -> None:
    """Copy complete records ``keys`` of ``source`` into ``out`` (written atomically)."""
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
