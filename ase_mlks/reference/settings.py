"""The pinned level of theory of every GPAW reference in ase_mlks, and version/setting logs.

One place decides the settings so that all models and tests agree:

* force-field and Hamiltonian data: GPAW LCAO, basis 'dzp', PBE, Fermi-Dirac 0.05 eV,
  slab boundary conditions (pbc = T, T, F; GPAW's Dirichlet Poisson solver puts the zero of
  the electrostatic potential, i.e. the vacuum level of a non-polar slab, at the cell faces
  along z), real-space grid spacing h ~ 0.2 Å turned into explicit ``gpts`` (GPAW would
  otherwise round h its own way), Gamma-centred k-grids, no point-group symmetry (the
  Wannier construction needs the full grid; time reversal is kept and undone later), plus
  Grimme D3(BJ) dispersion from the ``dftd3`` package added to energies, forces and stress.
* GW data: GPAW plane waves, see :mod:`ase_mlks.reference.gw` for the G0W0 settings.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field, replace

import numpy as np

__all__ = ["LCAOSettings", "FAST", "DEFAULT", "gpts_for", "versions", "require_gpaw"]


def require_gpaw():
    """Import GPAW or fail with a message saying how to install it."""
    try:
        import gpaw  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "GPAW is not installed: the reference pipeline needs it. Install it with "
            "'bash scripts/run setup' (builds GPAW from PyPI with scripts/gpaw_siteconfig.py)."
        ) from err
    return gpaw


@dataclass(frozen=True)
class LCAOSettings:
    """GPAW LCAO settings of the force/Hamiltonian reference data.

    kpts: Gamma-centred Monkhorst-Pack size (k1, k2) for the slab (k3 = 1). h: target grid
    spacing (Å), converted to gpts divisible by 4. d3: add D3(BJ) dispersion.
    """

    basis: str = "dzp"
    xc: str = "PBE"
    width: float = 0.05  # eV, Fermi-Dirac
    h: float = 0.2
    kpts: tuple[int, int] = (3, 3)
    d3: bool = True
    d3_method: str = "PBE"
    d3_damping: str = "d3bj"
    # GPAW's default criteria (energy 5e-4 eV/electron, density 1e-4): forces to ~1e-3 eV/Å
    convergence: dict = field(default_factory=lambda: {"energy": 5e-4, "density": 1e-4})
    maxiter: int = 200

    def with_kpts(self, kpts) -> LCAOSettings:
        return replace(self, kpts=tuple(int(k) for k in kpts))

    def todict(self) -> dict:
        return asdict(self)

    @classmethod
    def fromdict(cls, d: dict) -> LCAOSettings:
        """Inverse of :meth:`todict`, also for its JSON form (a record's ``settings``)."""
        return cls(**d).with_kpts(d["kpts"])  # JSON turned the k-grid tuple into a list

    def tojson(self) -> str:
        return json.dumps(self.todict(), sort_keys=True)

    def gpaw_parameters(self, atoms) -> dict:
        """Keyword arguments of ``gpaw.GPAW`` for ``atoms`` (a slab)."""
        from gpaw import FermiDirac

        return dict(
            mode="lcao",
            basis=self.basis,
            xc=self.xc,
            occupations=FermiDirac(self.width),
            kpts={"size": (self.kpts[0], self.kpts[1], 1), "gamma": True},
            gpts=gpts_for(atoms, self.h),
            symmetry={"point_group": False, "time_reversal": True},
            convergence=dict(self.convergence),
            maxiter=self.maxiter,
        )


DEFAULT = LCAOSettings()
# fast settings for tests: coarser grid, looser convergence, same physics
FAST = LCAOSettings(h=0.25, kpts=(3, 3), convergence={"energy": 2e-3, "density": 5e-4})


def gpts_for(atoms, h: float) -> tuple[int, int, int]:
    """Grid points along each cell vector for spacing <= h (Å), each a multiple of 4."""
    lengths = atoms.cell.lengths()
    return tuple(int(4 * math.ceil(L / h / 4)) for L in lengths)


def versions() -> dict[str, str]:
    """Versions of the codes that produce a reference record."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("gpaw", "ase", "dftd3", "ase_mlks"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    try:
        import gpaw_data

        out["gpaw_data"] = str(getattr(gpaw_data, "__version__", "?"))
    except ImportError:
        pass
    return out
