"""GW-correction post-processor: crystal VAE of Kohn–Sham states + quasiparticle-correction
network (Hou, Wu & Qiu, Nat. Commun. 2024). See docs/gw.md.

Names are imported lazily so that ``python -m ase_mlks.gw.data`` / ``.trainer`` run cleanly.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GWCorrection": "ase_mlks.gw.calculator",
    "GWCalc": "ase_mlks.gw.calculator",
    "HeadNotTrainedError": "ase_mlks.gw.calculator",
    "CrystalVAE": "ase_mlks.gw.model",
    "GWModel": "ase_mlks.gw.model",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ase_mlks.gw' has no attribute {name!r}")
