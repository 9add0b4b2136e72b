"""DeepH-Zero benchmarks: variational DFT vs SCF (paper Fig. 3), single-structure training
from random weights (Fig. 4), generalization of the shipped model, equivariance, cost.

Each part prints a table and writes JSON (+ PNG plots) under benchmarks/out/:

    python benchmarks/deephzero.py variational --systems h2o na graphene mos2
    python benchmarks/deephzero.py fig4 --steps 300
    python benchmarks/deephzero.py generalization --model h2o-pbe-svp --n-test 20
    python benchmarks/deephzero.py equivariance --model h2o-pbe-svp

Run with OMP_NUM_THREADS=1 on a shared machine; all parts are deterministic (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, graphene, molecule, mx2

from ase_mlks.deephzero.data import distorted_water, scf_references
from ase_mlks.deephzero.density import orthogonalizer
from ase_mlks.deephzero.engine import HARTREE, PySCFEngine, engine_from_description
from ase_mlks.deephzero.model import DeepHE3, build_graph
from ase_mlks.deephzero.trainer import SYSTEMS, _absolute_plateau
from ase_mlks.deephzero.variational import FreeEnergy, variational_dft

OUT = Path(__file__).resolve().parent / "out"


def _save(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"deephzero_{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float))
    return path


# -- Fig. 3: variational DFT vs SCF ------------------------------------------------------
def fig3_systems() -> dict[str, tuple[Atoms, dict]]:
    h2o = molecule("H2O")
    na = bulk("Na", "bcc", a=4.23)
    gr = graphene(vacuum=5.0)
    gr.pbc = True
    mos2 = mx2("MoS2", a=3.18, vacuum=5.0)
    mos2.pbc = True
    gth = {"basis": "gth-szv", "xc": "PBE", "pseudo": "gth-pbe"}
    return {
        "h2o": (h2o, {"basis": "def2-svp", "xc": "PBE"}),
        "na": (na, {**gth, "kmesh": (2, 2, 2), "ke_cutoff": 20.0}),
        "graphene": (gr, {**gth, "kmesh": (2, 2, 1), "ke_cutoff": 20.0}),
        # PySCF's gth-szv has no Mo: the MOLOPT short-range single-zeta set for Mo (q14)
        "mos2": (mos2, {**gth, "basis": {"Mo": "gth-szv-molopt-sr", "S": "gth-szv"},
                        "kmesh": (2, 2, 1), "ke_cutoff": 20.0}),
    }


def run_variational(systems: list[str], sigma: float, steps: int) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = OUT / "deephzero_variational.json"
    table = json.loads(old.read_text()) if old.exists() else {}
    for name in systems:
        atoms, kw = fig3_systems()[name]
        eng = PySCFEngine(atoms, **kw)
        ref = eng.scf(sigma)
        res = variational_dft(eng, sigma, reference=ref, steps=steps, progress=True)
        last = res.history[-1]
        table[name] = {
            "engine": eng.describe(), "natoms": len(atoms), "nao": eng.nao, "sigma_Ha": sigma,
            "scf_cycles": ref.cycles, "scf_seconds": ref.seconds,
            "var_steps": last["step"], "var_evaluations": res.evaluations,
            "var_seconds": res.seconds,
            "dE_ueV_per_atom": abs(last["dE_eV"]) * 1e6 / len(atoms),
            "dE_eV_signed": last["dE_eV"],
            "dH_mean_meV": last["dH_eV"] * 1e3, "dH_max_meV": last["dH_max_eV"] * 1e3,
            "drho_mean": last["drho"], "history": res.history,
        }
        fig, ax = plt.subplots(figsize=(5, 3.5))
        steps_ = [h["step"] for h in res.history]
        for key, lab in [("dE_eV", "|ΔE| (eV)"), ("dH_eV", "ΔH (eV)"),
                         ("drho", "Δρ (e)"), ("grad_E_mean_eV", "|∇_H E|")]:
            ax.semilogy(steps_, [max(abs(h[key]), 1e-16) for h in res.history], label=lab)
        ax.set_xlabel("L-BFGS step")
        ax.set_title(f"variational DFT vs SCF: {name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        OUT.mkdir(parents=True, exist_ok=True)
        fig.savefig(OUT / f"deephzero_variational_{name}.png", dpi=120)
        plt.close(fig)
        print(f"{name:9s} |dE|={table[name]['dE_ueV_per_atom']:.2e} ueV/atom "
              f"dH={table[name]['dH_mean_meV']:.2e} meV (max {table[name]['dH_max_meV']:.2e}) "
              f"steps={last['step']} t={res.seconds:.0f}s  SCF: {ref.cycles} cycles "
              f"{ref.seconds:.1f}s", flush=True)
        _save("variational", table)
    return table


# -- Fig. 4: one structure, random weights, unsupervised vs supervised ---------------------
def run_fig4(steps: int, lr: float, sigma: float = 0.01) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atoms = molecule("H2O")
    kw = {"basis": "def2-svp", "xc": "PBE"}
    eng = PySCFEngine(atoms, **kw)
    ref = eng.scf(sigma)
    out = {}
    for mode in ["unsupervised", "supervised"]:
        torch.manual_seed(0)
        model = DeepHE3(eng.orbital_basis.to_dict(), engine=eng.describe(), sigma=sigma)
        with torch.no_grad():  # random weights everywhere, heads included
            for head in [*model.onsite_heads.values(), *model.hop_heads.values()]:
                torch.nn.init.normal_(head.weight, std=0.05)
        g = build_graph([atoms], model.cutoff, model.species)
        fe = FreeEnergy(eng, sigma=sigma, sc_weight=1.0)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=20,
                                                           min_lr=1e-5)
        _absolute_plateau(sched)  # the unsupervised loss is a negative energy (see trainer)
        hist = []
        t0 = time.perf_counter()
        target = torch.from_numpy(ref.fock)
        for step in range(steps):
            opt.zero_grad()
            h = model.hamiltonian_k(g)[0]
            if mode == "unsupervised":
                terms = fe.evaluate(h)
                loss = terms.loss
            else:
                loss = (h - target).pow(2).mean()
            loss.backward()
            opt.step()
            sched.step(float(loss.detach()))
            dh = float(np.mean(np.abs(h.detach().numpy() - ref.fock))) * HARTREE * 1e3
            rec = {"step": step + 1, "dH_meV": dh, "seconds": time.perf_counter() - t0}
            if mode == "unsupervised":
                rec["dE_meV"] = (float(terms.free_energy.detach()) - ref.free_energy) \
                    * HARTREE * 1e3
            hist.append(rec)
            if step % 25 == 0:
                print(mode, rec, flush=True)
        out[mode] = {"final_dH_meV": hist[-1]["dH_meV"],
                     "best_dH_meV": min(r["dH_meV"] for r in hist), "history": hist}
        print(f"{mode:12s} final dH = {hist[-1]['dH_meV']:.2f} meV, best "
              f"{out[mode]['best_dH_meV']:.2f} meV after {steps} Adam steps", flush=True)
        _save("fig4", out)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, r in out.items():
        ax.semilogy([h["step"] for h in r["history"]], [h["dH_meV"] for h in r["history"]],
                    label=mode)
    ax.set_xlabel("training step (Adam)")
    ax.set_ylabel("mean |H_θ − H_SCF| (meV)")
    ax.set_title("H2O, one structure, from random weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "deephzero_fig4_h2o.png", dpi=120)
    plt.close(fig)
    return out


# -- generalization + cost -----------------------------------------------------------------
def _test_set(model: DeepHE3, n_test: int, seed: int) -> tuple[str, list[Atoms], dict]:
    """Unseen structures of the system the model was trained on (recorded in the checkpoint:
    distorted water, or rattled/strained bcc Na) and that system's engine settings."""
    system = (model.checkpoint_meta.get("extra") or {}).get("system", "h2o")
    gen, eng_kw, _, _ = SYSTEMS[system]
    return system, gen(n_test, seed=seed), eng_kw


def _state_errors(h: np.ndarray, ref: dict, window_ha: float = 2.0 / HARTREE) -> dict:
    """H and eigenvalue errors (meV) of H_theta(k) (nk, n, n) against an SCF reference:
    occupied levels (below the reference chemical potential) at every k, the lowest empty
    level (molecules) and the levels within 2 eV of mu (metals)."""
    S = np.asarray(ref["overlap"])
    fock = np.asarray(ref["fock"])
    e_ref = np.asarray(ref["mo_energy"], dtype=float)
    X = orthogonalizer(S)
    e_pred = np.array([np.linalg.eigvalsh(x.conj().T @ hk @ x) for x, hk in zip(X, h)])
    occ = e_ref < ref["mu"]
    near = np.abs(e_ref - ref["mu"]) < window_ha
    out = {"H_mae_meV": float(np.mean(np.abs(h - fock))) * HARTREE * 1e3,
           "occ_eig_mae_meV": float(np.mean(np.abs(e_pred - e_ref)[occ])) * HARTREE * 1e3}
    if len(h) > 1:  # metal: the levels near the Fermi level
        out["eig_mae_within_2eV_of_mu_meV"] = \
            float(np.mean(np.abs(e_pred - e_ref)[near])) * HARTREE * 1e3
    if len(h) == 1:  # molecule: the LUMO, fixed only by the self-consistency term
        nocc = int(occ[0].sum())
        out["lumo_err_meV"] = float(abs(e_pred[0, nocc] - e_ref[0, nocc])) * HARTREE * 1e3
    return out


def run_generalization(model_name: str, n_test: int, seed: int,
                       n_timing: int = 5, with_engine: bool = True) -> dict:
    model = DeepHE3.load(model_name)
    desc = model.engine_description
    sigma = model.sigma
    system, structures, eng_kw = _test_set(model, n_test, seed)
    cache = f"deephzero_test_seed{seed}.h5" if system == "h2o" else \
        f"deephzero_test_{system}_seed{seed}.h5"
    refs = scf_references(structures, eng_kw, sigma, OUT / cache)
    rows = []
    t_inf, t_scf = [], []
    for n, (atoms, ref) in enumerate(zip(structures, refs)):
        eng = engine_from_description(atoms, desc) if (with_engine or any(atoms.pbc)) else None
        kpts = [eng.kpts] if any(atoms.pbc) else None
        t0 = time.perf_counter()  # inference = neighbour graph + network forward pass
        g = build_graph([atoms], model.cutoff, model.species)
        with torch.no_grad():
            h = model.hamiltonian_k(g, kpts)[0]
        t_inf.append(time.perf_counter() - t0)
        row = _state_errors(h.numpy(), ref)
        if with_engine:
            if n < n_timing:  # cost: one SCF of the same engine, side by side
                t0 = time.perf_counter()
                eng.scf(sigma)
                t_scf.append(time.perf_counter() - t0)
            terms = FreeEnergy(eng, sigma=sigma, sc_weight=0.0).evaluate(h)
            row["dE_meV"] = (float(terms.free_energy.detach()) - float(ref["free_energy"])) \
                * HARTREE * 1e3
        rows.append(row)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    summary["inference_s"] = float(np.median(t_inf))
    if with_engine:
        summary["dE_min_meV"] = float(min(r["dE_meV"] for r in rows))
        summary["dE_max_meV"] = float(max(r["dE_meV"] for r in rows))
        summary["scf_s"] = float(np.median(t_scf))
        summary["speedup_scf_over_inference"] = summary["scf_s"] / summary["inference_s"]
    out = {"model": model_name, "system": system, "n_test": n_test, "seed": seed,
           "summary": summary, "rows": rows, "engine": desc, "sigma": sigma}
    _save(f"generalization_{Path(model_name).stem}", out)
    for k, v in summary.items():
        print(f"{k:28s} {v:.4g}")
    return out


def run_equivariance(model_name: str) -> dict:
    from scipy.spatial.transform import Rotation

    model = DeepHE3.load(model_name)
    atoms = distorted_water(1, seed=123)[0]
    h = model.hamiltonian_k(build_graph([atoms], model.cutoff, model.species))[0][0].detach()
    errs = []
    for s in range(10):
        R = Rotation.random(random_state=s).as_matrix()
        rot = atoms.copy()
        rot.positions = atoms.positions @ R.T
        hr = model.hamiltonian_k(build_graph([rot], model.cutoff, model.species))[0][0]
        D = torch.from_numpy(model.basis.structure_rotation(atoms.numbers, R))
        errs.append(float((D @ h @ D.T - hr.detach()).abs().max()) * HARTREE)
    out = {"max_abs_error_eV": max(errs), "max_abs_H_eV": float(h.abs().max()) * HARTREE}
    _save(f"equivariance_{Path(model_name).stem}", out)
    print(out)
    return out


# -- band structure of a periodic model vs the engine's SCF bands ---------------------------
def run_bands(model_name: str, npoints: int, path_name: str = "GMKG") -> dict:
    """Bands of the model's H_theta(k) (DeepHZeroCalc) and of the SCF Kohn-Sham matrix of
    the same engine (PySCF ``get_bands`` from the converged density) along a BandPath, on
    the ideal structure of the model's system (graphene: a = 2.46 Å); MAE per band and plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ase_mlks.deephzero import DeepHZeroCalc

    model = DeepHE3.load(model_name)
    system = (model.checkpoint_meta.get("extra") or {}).get("system")
    if system != "graphene":
        raise SystemExit(f"bands: implemented for the graphene model, not {system!r}")
    atoms = graphene(a=2.46, vacuum=5.0)
    atoms.pbc = True
    calc = DeepHZeroCalc(model=model)
    atoms.calc = calc
    path = atoms.cell.bandpath(path_name, npoints=npoints)
    t0 = time.perf_counter()
    e_model = calc.band_structure(path=path).energies[0]           # (nk, nbands) eV
    t_model = time.perf_counter() - t0
    eng = engine_from_description(atoms, model.engine_description)
    t0 = time.perf_counter()
    ref = eng.scf(model.sigma)
    kabs = eng.mol.get_abs_kpts(path.kpts)
    e_ref, _ = eng.mf.get_bands(kabs, dm_kpts=eng._dm_for_pyscf(ref.dm))
    t_ref = time.perf_counter() - t0
    e_ref = np.sort(np.asarray(e_ref), axis=1) * HARTREE
    mu = float(ref.mu) * HARTREE
    err = np.abs(np.sort(e_model, axis=1) - e_ref)
    near = np.abs(e_ref - mu) < 3.0
    out = {"model": model_name, "path": path_name, "npoints": npoints, "mu_eV": mu,
           "mae_all_bands_meV": float(err.mean()) * 1e3,
           "mae_within_3eV_of_mu_meV": float(err[near].mean()) * 1e3,
           "mae_per_band_meV": (err.mean(axis=0) * 1e3).tolist(),
           "model_seconds": t_model, "scf_plus_bands_seconds": t_ref}
    x, xs, labels = path.get_linear_kpoint_axis()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(x, e_ref - mu, color="k", lw=1.5)
    ax.plot(x, np.sort(e_model, axis=1) - mu, color="tab:red", ls="--", lw=1.2)
    ax.plot([], [], color="k", label="PySCF SCF (same engine)")
    ax.plot([], [], color="tab:red", ls="--", label="DeepH-Zero network (no labels)")
    ax.set_xticks(xs, [lab.replace("G", "Γ") for lab in labels])
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(-12, 8)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_ylabel("E − μ (eV)")
    ax.set_title(f"graphene, band MAE {out['mae_within_3eV_of_mu_meV']:.0f} meV (±3 eV of μ)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "deephzero_bands_graphene.png", dpi=120)
    plt.close(fig)
    _save(f"bands_{Path(model_name).stem}", out)
    for k in ("mae_all_bands_meV", "mae_within_3eV_of_mu_meV", "model_seconds",
              "scf_plus_bands_seconds"):
        print(f"{k:28s} {out[k]:.4g}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    v = sub.add_parser("variational")
    v.add_argument("--systems", nargs="+", default=["h2o", "na", "graphene", "mos2"])
    v.add_argument("--sigma", type=float, default=0.01, help="Fermi smearing (Ha)")
    v.add_argument("--steps", type=int, default=150)
    f = sub.add_parser("fig4")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--lr", type=float, default=5e-3)
    g = sub.add_parser("generalization")
    g.add_argument("--model", default="h2o-pbe-svp")
    g.add_argument("--n-test", type=int, default=20)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--n-timing", type=int, default=5, help="structures timed with a full SCF")
    g.add_argument("--no-engine", action="store_true",
                   help="H and eigenvalue errors only (no E[H] evaluation, no SCF timing)")
    b = sub.add_parser("bands")
    b.add_argument("--model", default="graphene-pbe-szv")
    b.add_argument("--npoints", type=int, default=40)
    e = sub.add_parser("equivariance")
    e.add_argument("--model", default="h2o-pbe-svp")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.part == "variational":
        run_variational(args.systems, args.sigma, args.steps)
    elif args.part == "fig4":
        run_fig4(args.steps, args.lr)
    elif args.part == "generalization":
        run_generalization(args.model, args.n_test, args.seed, args.n_timing,
                           not args.no_engine)
    elif args.part == "bands":
        run_bands(args.model, args.npoints)
    else:
        run_equivariance(args.model)


if __name__ == "__main__":
    main()
