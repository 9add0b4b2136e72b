"""Scaling of the shared core: neighbour list + H(R) assembly + Bloch sum + sparse eigensolve.

Systems: disordered graphene p_z sheets of ~1,000 / 4,000 / 16,000 orbitals (one orbital
per atom, hoppings to the third shell, random on-site energies), 20 bands nearest 0.1 eV by
shift-invert Lanczos; dense ``eigh`` alongside for the sizes where it is affordable.

    python benchmarks/core_scaling.py [--sizes 1000 4000 16000] [--out benchmarks/out]

Prints a table and writes ``core_scaling.json``; the fitted exponent t ~ N^p tells the
scaling (O(N) for the neighbour list and Bloch sum; the sparse solve is dominated by the
sparse LU factorization of H(k) - sigma).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase.build import graphene

from ase_mlks.core.graph import neighbor_list
from ase_mlks.testing import PzTightBindingCalc


def sheet(norb: int):
    n = int(round(np.sqrt(norb / 2)))
    atoms = graphene(a=2.46, vacuum=8.0).repeat((n, n, 1))
    atoms.pbc = (True, True, False)
    return atoms


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run(norb: int, dense_limit: int, nbands: int = 20) -> dict:
    atoms = sheet(norb)
    rng = np.random.default_rng(0)
    calc = PzTightBindingCalc(cutoff=3.0, onsite=rng.normal(0, 0.3, len(atoms)))
    _, t_nl = timed(neighbor_list, atoms, 3.0)
    ham, t_build = timed(calc.build_hamiltonian, atoms)
    k = np.array([0.1, 0.2, 0.0])
    _, t_bloch = timed(ham.hk, k, sparse=True)
    eig_sparse, t_sparse = timed(ham.eigenvalues, [k], nbands=nbands, sigma=0.1, solver="sparse")
    row = {"norb": ham.norb, "nnz": ham.nnz, "neighbour_list_s": t_nl,
           "build_H_s": t_build, "bloch_sum_s": t_bloch, "sparse_eigsh_s": t_sparse}
    if ham.norb <= dense_limit:
        eig_dense, t_dense = timed(ham.eigenvalues, [k], nbands=nbands, sigma=0.1,
                                   solver="dense")
        row["dense_eigh_s"] = t_dense
        row["max_abs_diff_eV"] = float(np.abs(eig_dense - eig_sparse).max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--dense-limit", type=int, default=4500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    rows = [run(n, args.dense_limit) for n in args.sizes]
    cols = ["norb", "nnz", "neighbour_list_s", "build_H_s", "bloch_sum_s", "sparse_eigsh_s",
            "dense_eigh_s", "max_abs_diff_eV"]
    print(" ".join(f"{c:>16s}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:16.4g}" if c in r else f"{'-':>16s}" for c in cols))
    n = np.array([r["norb"] for r in rows], float)
    exponents = {}
    if len(rows) > 1:
        for c in ("neighbour_list_s", "build_H_s", "bloch_sum_s", "sparse_eigsh_s"):
            exponents[c] = float(np.polyfit(np.log(n), np.log([r[c] for r in rows]), 1)[0])
        print("scaling exponent p (t ~ N^p): " +
              ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "core_scaling.json").write_text(json.dumps({"rows": rows,
                                                            "exponents": exponents}, indent=2))


if __name__ == "__main__":
    main()
