"""Command line of the reference pipeline.

Examples::

    python -m ase_mlks.reference bilayer --out data/mos2_bilayer.h5 --start 0 --count 100
    python -m ase_mlks.reference monolayer --materials MoS2 WS2 --out tests/data/ref.h5
    python -m ase_mlks.reference twisted --index 1 2 --out tests/data/ref.h5 --gamma
    python -m ase_mlks.reference twisted --index 1 2 --stacking "AA'" --out tests/data/ref.h5
    python -m ase_mlks.reference gw --materials MoS2 MoSe2 --out data/gw_monolayers.h5

Every command skips structures already complete in ``--out`` (resume). ``--workers N``
runs N structures side by side; ``--mpi N`` re-launches the same command under
``gpaw -P N`` (GPAW's MPI), for machines whose GPAW is built with MPI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys

from ..core.errors import AseMlksError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--kpts", type=int, nargs=2, default=None, help="SCF k-grid (k1 k2)")
    p.add_argument("--h", type=float, default=None, help="grid spacing (Å)")
    p.add_argument("--fast", action="store_true", help="FAST settings (tests)")
    p.add_argument("--no-d3", action="store_true", help="skip D3 dispersion")
    p.add_argument("--wannier-kpts", type=int, nargs=2, default=None,
                   help="k-grid of the non-SCF run for the Wannier H(R)")
    p.add_argument("--no-wannier", action="store_true")
    p.add_argument("--h-threshold", type=float, default=1e-4,
                   help="drop |H(R)| below this (eV) when storing")
    p.add_argument("--gpaw-bands", action="store_true",
                   help="store GPAW bands on the G-M-K-G path near the gap")
    p.add_argument("--ao", action="store_true", help="also store AO H(R), S(R)")
    p.add_argument("--frozen", type=float, nargs=2, default=None,
                   help="frozen window (eV vs E_F) for disentangled Wannier H(R)")
    p.add_argument("--outer", type=float, nargs=2, default=None,
                   help="outer window (eV vs E_F); with --frozen")
    p.add_argument("--weight-selection", action="store_true",
                   help="select the Wannier manifold by projection weight (default)")
    p.add_argument("--localize", type=int, default=0, metavar="STEPS",
                   help="spread-minimizing steps after the Löwdin projection (default 0)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--txtdir", default=None, help="directory for GPAW text logs")
    p.add_argument("--mpi", type=int, default=0, help="re-run under 'gpaw -P N'")


def _settings(args, default_kpts):
    from .settings import DEFAULT, FAST

    s = FAST if args.fast else DEFAULT
    s = s.with_kpts(args.kpts or default_kpts)
    if args.h is not None:
        from dataclasses import replace

        s = replace(s, h=args.h)
    if args.no_d3:
        from dataclasses import replace

        s = replace(s, d3=False)
    return s


# With all nao bands computed, the Mo-d/S-p manifold of the MoS2 bilayer is isolated
# (selection by weight: 7.5 meV max band error on a 4x4 grid, 2.8/0.7 meV at the band edges,
# vs 66 meV for the frozen/outer disentanglement below), so weight selection is the default;
# windows (eV vs E_F; S 3s lies ~13.5 eV below E_F) remain available via --frozen/--outer.
BILAYER_WINDOWS = {"frozen": (-10.0, 2.0), "outer": (-10.0, 12.0)}


def _options(args, basis, wannier_kpts, selection="weight"):
    from .pipeline import RecordOptions

    if args.weight_selection:
        selection = "weight"
    elif args.frozen is not None:
        selection = {"frozen": tuple(args.frozen),
                     "outer": tuple(args.outer or (args.frozen[0], args.frozen[1] + 10.0))}
    return RecordOptions(
        wannier_selection=selection,
        wannier_basis={} if args.no_wannier else basis,
        wannier_kpts=tuple(args.wannier_kpts) if args.wannier_kpts else wannier_kpts,
        h_threshold=args.h_threshold, gpaw_bands=args.gpaw_bands, ao=args.ao,
        localization_steps=args.localize)


def twisted_key(material: str, m: int, n: int, stacking: str = "AA") -> str:
    """Record name of a twisted cell; the AA-type keeps the name older files use."""
    suffix = {"AA": "", "AA'": "_AAp"}[stacking]
    return f"twisted_{material}_{m}_{n}{suffix}"


def _basis_for(atoms) -> dict:
    from .wannier import TMD_BASIS

    out = {}
    for s in set(atoms.get_chemical_symbols()):
        if s not in TMD_BASIS:
            from ..core.errors import UnknownElementError

            raise UnknownElementError(f"no default Wannier projection for element {s}")
        out[s] = TMD_BASIS[s]
    return out


def shell_quote(arg: str) -> str:
    """``arg`` as one shell word (for the stored ``command``), readable where possible:
    ``"AA'"`` rather than shlex's ``'AA'"'"''`` for a word with a single quote and none of
    the characters a double-quoted word would expand."""
    quoted = shlex.quote(arg)
    if quoted != arg and "'" in arg and not any(c in arg for c in '"$`\\!'):
        test = f'"{arg}"'
        if shlex.split(test) == [arg]:
            return test
    return quoted


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m ase_mlks.reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bilayer", help="randomly displaced bilayer configurations")
    _common(p)
    p.add_argument("--material", default="MoS2")
    p.add_argument("--supercell", type=int, nargs=2, default=None,
                   help="repeats of the primitive cell (default 2 2), or of the twisted "
                        "cell with --twist (default 1 1)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stacking", default="AA")
    p.add_argument("--strain", type=float, default=0.0,
                   help="max in-plane strain of the cell (e.g. 0.08 for ±8 %%)")
    p.add_argument("--twist", type=int, nargs=2, default=None, metavar=("M", "N"),
                   help="start from the commensurate twisted cell (M, N) instead of an "
                        "aligned one (e.g. 1 2 with --stacking \"AA'\": 21.79°, 2H-type)")
    p.add_argument("--prefix", default="bl", help="record names: PREFIX + 5-digit index")
    p = sub.add_parser("monolayer", help="monolayers of 2D materials")
    _common(p)
    p.add_argument("--materials", nargs="+", default=["MoS2"])
    p.add_argument("--count", type=int, default=0,
                   help="distorted configurations per material (0: the ideal monolayer)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rattle", type=float, default=0.05, help="Gaussian std (Å), with --count")
    p.add_argument("--strain", type=float, default=0.03,
                   help="max in-plane strain, with --count")
    p = sub.add_parser("twisted", help="commensurate twisted bilayer (m, n)")
    _common(p)
    p.add_argument("--material", default="MoS2")
    p.add_argument("--index", type=int, nargs=2, default=(1, 2))
    p.add_argument("--stacking", default="AA", choices=("AA", "AA'"),
                   help="AA: layer 2 rotated about a shared metal site (record "
                        "twisted_<material>_<m>_<n>); AA': layer 2 inverted first, the 2H-type "
                        "family (record name + '_AAp')")
    p = sub.add_parser("gw", help="KS states + G0W0 energies of monolayers")
    p.add_argument("--out", required=True)
    p.add_argument("--materials", nargs="+", default=["MoS2"])
    p.add_argument("--preset", default="default", help="G0W0 settings preset (see gw.py)")
    p.add_argument("--workdir", default="runs/gw")
    p.add_argument("--mpi", type=int, default=0)
    p = sub.add_parser("gw-study", help="G0W0 convergence study of one monolayer (resumable)")
    p.add_argument("--material", default="MoS2")
    p.add_argument("--base", default="minimal", help="preset the variants change")
    p.add_argument("--variants", required=True,
                   help='JSON {label: {setting: value}}, e.g. \'{"w20": {"omega2": 20}}\'')
    p.add_argument("--workdir", default="runs/gwstudy")
    p.add_argument("--log", default=None,
                   help="JSON-lines results (default WORKDIR/study.jsonl); done labels skipped")
    p = sub.add_parser("relax", help="relax a stored structure with GPAW (+D3); resumable")
    p.add_argument("--record", required=True, help="HDF5 file holding the structure")
    p.add_argument("--key", required=True, help="record to relax; relaxed_positions go back")
    p.add_argument("--workdir", required=True, help="BFGS trajectory/Hessian (resume)")
    p.add_argument("--fmax", type=float, default=0.05, help="max |F| criterion (eV/Å)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--kpts", type=int, nargs=2, default=None, help="SCF k-grid (k1 k2)")
    p.add_argument("--h", type=float, default=None, help="grid spacing (Å)")
    p.add_argument("--fast", action="store_true", help="FAST settings (tests)")
    p.add_argument("--no-d3", action="store_true", help="skip D3 dispersion")
    p.add_argument("--txt", default=None, help="GPAW text log")
    p.add_argument("--mpi", type=int, default=0, help="re-run under 'gpaw -P N'")
    p.add_argument("--start-from", default=None, metavar="FILE",
                   help="start from FILE's GPAW-relaxed positions of the same key (e.g. "
                        "to redo a Γ-only relaxation on a denser k-grid)")
    p = sub.add_parser("summary", help="table of what an output file holds")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("repack", help="rewrite files compactly (small arrays uncompressed)")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("extract", help="copy records into another file (fixtures, splits)")
    p.add_argument("source")
    p.add_argument("keys", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--h-threshold", type=float, default=None,
                   help="also drop Wannier |H| below this (eV) (smaller fixtures)")
    p.add_argument("--h-quantum", type=float, default=None,
                   help="store Wannier H(R) as integer multiples of this (eV), e.g. 1e-6")
    args = parser.parse_args(argv)
    if args.cmd == "extract":
        from .summary import extract

        extract(args.source, args.keys, args.out, h_threshold=args.h_threshold,
                h_quantum=args.h_quantum)
        return 0
    if args.cmd == "repack":
        from ..core.io import repack_hdf5

        for path in args.files:
            before, after = repack_hdf5(path)
            print(f"{path}: {before / 1e6:.3f} MB -> {after / 1e6:.3f} MB")
        return 0
    if args.cmd == "summary":
        from .summary import print_summary

        for path in args.files:
            print_summary(path)
        return 0
    command = "python -m ase_mlks.reference " + " ".join(shell_quote(a) for a in argv)

    if getattr(args, "mpi", 0) and not os.environ.get("ASE_MLKS_UNDER_MPI"):
        rest = [a for i, a in enumerate(argv)
                if a != "--mpi" and (i == 0 or argv[i - 1] != "--mpi")]
        cmd = ["gpaw", "-P", str(args.mpi), "python", "-m", "ase_mlks.reference", *rest]
        env = {**os.environ, "ASE_MLKS_UNDER_MPI": "1"}
        return subprocess.call(cmd, env=env)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return _run(args, command)
    except AseMlksError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args, command: str) -> int:
    from . import pipeline
    from .settings import require_gpaw

    require_gpaw()
    if args.cmd == "relax":
        return _relax(args, command)
    if args.cmd == "gw-study":
        return _gw_study(args)
    if args.cmd == "gw":
        from .gw import run_gw_dataset

        run_gw_dataset(args.out, args.materials, preset=args.preset, workdir=args.workdir,
                       command=command)
        return 0
    if args.cmd == "bilayer":
        twist = tuple(args.twist) if args.twist else None
        size = tuple(args.supercell) if args.supercell else None  # the generator's default
        items = list(pipeline.bilayer_items(args.start, args.count, seed=args.seed,
                                            material=args.material, size=size,
                                            stacking=args.stacking, strain=args.strain,
                                            twist=twist, prefix=args.prefix))
        basis = _basis_for(items[0][1])
        if twist is None:  # k-grids scaled to the aligned supercell: 6x6 SCF per primitive
            n = max(size or (2, 2))
            settings = _settings(args, (max(1, 6 // n), max(1, 6 // n)))
            options = _options(args, basis, (12 // n, 12 // n))
        else:  # as the 'twisted' command: Γ-only SCF unless --kpts says otherwise
            settings = _settings(args, (1, 1))
            options = _options(args, basis, None)
    elif args.cmd == "monolayer":
        from ..structures import monolayer

        if args.count > 0:
            items = [it for m in args.materials
                     for it in pipeline.monolayer_items(m, args.start, args.count,
                                                        seed=args.seed,
                                                        rattle_std=args.rattle,
                                                        strain=args.strain)]
        else:
            items = [(f"monolayer_{m}", monolayer(m)) for m in args.materials]
        settings = _settings(args, (12, 12))
        basis = _basis_for(items[0][1])
        options = _options(args, basis, (18, 18))
    elif args.cmd == "twisted":
        from ..structures import twisted_bilayer

        m, n = args.index
        atoms = twisted_bilayer(args.material, m, n, stacking=args.stacking)
        items = [(twisted_key(args.material, m, n, args.stacking), atoms)]
        settings = _settings(args, (1, 1))
        options = _options(args, _basis_for(atoms), None)
    else:  # pragma: no cover
        raise SystemExit(f"unknown command {args.cmd}")
    new = pipeline.run_dataset(args.out, items, settings, options, workers=args.workers,
                               command=command, txtdir=args.txtdir)
    print(f"{len(new)} new structures written to {args.out}")
    return 0

def _gw_study(args) -> int:
    from pathlib import Path

    from ..structures import monolayer
    from .gw import convergence_study, preset_settings, print_study

    try:
        variants = json.loads(args.variants)
        if not isinstance(variants, dict) or not all(isinstance(v, dict)
                                                     for v in variants.values()):
            raise ValueError("expected a JSON object {label: {setting: value}}")
        # checked here, before any G0W0 run: unknown preset or setting names
        vacuum = {k: preset_settings(args.base, **v).vacuum for k, v in variants.items()}
    except ValueError as err:
        print(f"error: --variants: {err}", file=sys.stderr)
        return 2
    log = args.log or str(Path(args.workdir) / "study.jsonl")
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    for vac in sorted(set(vacuum.values())):  # the slab is built per vacuum size
        group = {k: v for k, v in variants.items() if vacuum[k] == vac}
        rows.update(convergence_study(monolayer(args.material, vacuum=vac), group,
                                      args.workdir, base=args.base, log_path=log))
    print_study({k: rows[k] for k in variants})
    return 0


def _relax(args, command: str) -> int:
    from ..core.dataset import StructureDataset
    from .relax import relax_structure, relaxed_positions_of, store_relaxation

    with StructureDataset(args.record, "r") as ds:
        if args.key not in ds:
            raise SystemExit(f"error: no record {args.key!r} in {args.record}")
        rec = ds.read(args.key)
    atoms = rec["atoms"]
    if args.start_from:
        atoms.positions = relaxed_positions_of(args.start_from, args.key, atoms)
    # the k-grid of the record's own SCF, so that relaxed and stored forces agree
    stored = json.loads(rec["attrs"].get("settings", "{}"))
    settings = _settings(args, tuple(stored.get("kpts", (1, 1))))
    result = relax_structure(atoms, args.workdir, settings, fmax=args.fmax, steps=args.steps,
                             txt=args.txt)
    print(f"{args.key}: {result.steps} BFGS steps, max |F| {result.fmax:.4f} eV/Å, "
          f"E {result.energy:.4f} eV, {result.cpu_time:.0f} CPU-s, net z force per layer "
          + " / ".join(f"{f:+.3f}" for f in result.layer_net_force_z or []) + " eV/Å"
          + ("" if result.converged else " (NOT converged: run again to continue)"))
    if result.converged:
        store_relaxation(args.record, args.key, result, settings, args.fmax, command)
    return 0 if result.converged else 1

if __name__ == "__main__":
    sys.exit(main())
