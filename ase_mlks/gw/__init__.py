"""GW-correction post-processor: crystal VAE of Kohn–Sham states + quasiparticle-correction
network (Hou, Wu & Qiu, Nat. Commun. 2024). See docs/gw.md."""

from .calculator import GWCalc, GWCorrection, HeadNotTrainedError
from .model import CrystalVAE, GWModel

__all__ = ["GWCorrection", "GWCalc", "HeadNotTrainedError", "CrystalVAE", "GWModel"]
