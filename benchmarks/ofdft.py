"""Benchmark of VAE orbital-free DFT (Costa, Scriva & Pilati) on held-out test potentials.

For each testbed: latent-space descent (Adam, as in the paper; and L-BFGS) vs the naive
density-space descent, against exact diagonalization of the same potentials (test set
generated with seed 1, never seen in training, which uses seed 0).  Reports mean |e_min - e_gs|,
int |n_min - n_gs|, variational violations, the functional's error on exact densities and the
VAE's reconstruction error; writes histograms (PNG) and JSON.  Speed: latent descent vs exact
diagonalization on the same potential, and how both grow with the 3D grid (18^3, 32^3, 48^3).

    python benchmarks/ofdft.py --testbeds gauss3d gauss1d speckle1d --n-test 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ase_mlks.ofdft.data import (
    cubic_testbed,
    generate_dataset,
    get_testbed,
    ground_state,
    load_dataset,
)
from ase_mlks.ofdft.model import ARCHITECTURES, DensityVAE, FunctionalCNN, OFDFTModel
from ase_mlks.ofdft.solver import (
    density_descent,
    integrated_density_error,
    latent_descent,
    load_model,
)
from ase_mlks.ofdft.trainer import split, train_vae

CHEMICAL_ACCURACY = 1.6e-3  # E0 (1 kcal/mol in Hartree)
VIOLATION = 1e-4  # e_min < e_gs - 1e-4 E0 counts as a variational violation


def _stats(e_min: np.ndarray, e_gs: np.ndarray, n_min: np.ndarray, n_gs: np.ndarray,
           dv: float, diverged: np.ndarray | None = None) -> dict[str, float]:
    de = e_min - e_gs
    dn = integrated_density_error(n_min, n_gs, dv)
    diverged = ~np.isfinite(de) if diverged is None else diverged | ~np.isfinite(de)
    finite = ~diverged  # the statistics below are over the instances that did not diverge
    return {
        "mean_abs_de_E0": float(np.mean(np.abs(de[finite]))) if finite.any() else float("nan"),
        "std_abs_de_E0": float(np.std(np.abs(de[finite]))) if finite.any() else float("nan"),
        "median_abs_de_E0": float(np.median(np.abs(de[finite]))) if finite.any() else float("nan"),
        "max_abs_de_E0": float(np.max(np.abs(de[finite]))) if finite.any() else float("nan"),
        "mean_de_E0": float(np.mean(de[finite])) if finite.any() else float("nan"),
        "mean_density_error": float(np.mean(dn[finite])) if finite.any() else float("nan"),
        "frac_variational_violation_1e-4": float(np.mean(~finite | (de < -VIOLATION))),
        "frac_violation_beyond_1mHa": float(np.mean(~finite | (de < -1e-3))),
        "frac_within_chemical_accuracy": float(np.mean(finite & (np.abs(de) < CHEMICAL_ACCURACY))),
        "frac_negative_density": float(np.mean(np.asarray(n_min).reshape(len(de), -1).min(1) < 0)),
        # diverged (a non-finite step): counted as violations, left out of the means
        "frac_diverged": float(np.mean(diverged)),
        "n": int(len(de)),
    }


def _batched(fn, v: torch.Tensor, batch: int):
    outs = [fn(v[i:i + batch]) for i in range(0, len(v), batch)]
    return [torch.cat([o[k] for o in outs]) if isinstance(outs[0][k], torch.Tensor)
            else [o[k] for o in outs] for k in range(len(outs[0]))]


def evaluate_testbed(name: str, model_ref: str, n_test: int, workdir: Path, out: Path,
                     steps: int | None, lr: float | None, batch: int, use_val: bool,
                     lbfgs_steps: int, test_seed: int = 1) -> dict:
    """Accuracy of latent (Adam and L-BFGS) and naive descent on held-out potentials."""
    tb = get_testbed(name)
    model = load_model(model_ref)
    if use_val:  # for tuning descent settings: the validation split of the training data
        data = load_dataset(workdir / "data" / name / "train")
        _, va = split(len(data["energy"]))
        data = {k: v[va[:n_test]] for k, v in data.items()}
    else:
        # seed 1 is the standard test set; other seeds give fresh, independent ones
        folder = "test" if test_seed == 1 else f"test-seed{test_seed}"
        data = load_dataset(generate_dataset(name, workdir / "data" / name / folder, n_test,
                                             seed=test_seed, progress=False), limit=n_test)
    v = torch.as_tensor(data["potential"], dtype=torch.float32)
    n_gs, e_gs, f_gs = data["density"], data["energy"], data["functional"]
    res: dict = {"testbed": name, "model": str(model_ref),
                 "split": "val" if use_val else f"test (seed {test_seed})"}
    with torch.no_grad():
        n_t = torch.as_tensor(n_gs)
        res["functional_mae_on_exact_density_E0"] = float(
            np.mean(np.abs(model.functional(n_t).numpy() - f_gs)))
        rec = model.vae.decode(model.vae.encode(n_t)[0]).numpy()
        res["vae_reconstruction_error"] = float(np.mean(
            integrated_density_error(rec, n_gs, tb.dv)))

    t0 = time.perf_counter()
    z, e, n, nsteps, _ = _batched(lambda x: latent_descent(model, x, steps=steps, lr=lr),
                                  v, batch)
    t_latent = time.perf_counter() - t0
    res["latent_adam"] = _stats(e.numpy(), e_gs, n.numpy(), n_gs, tb.dv)
    res["latent_adam"]["steps"] = int(max(nsteps))
    res["latent_adam"]["seconds_per_instance"] = t_latent / len(v)

    t0 = time.perf_counter()
    _, e_l, n_l, nev, _ = _batched(
        lambda x: latent_descent(model, x, steps=lbfgs_steps, optimizer="lbfgs"), v, batch)
    res["latent_lbfgs"] = _stats(e_l.numpy(), e_gs, n_l.numpy(), n_gs, tb.dv)
    res["latent_lbfgs"]["evaluations"] = int(max(nev))
    res["latent_lbfgs"]["seconds_per_instance"] = (time.perf_counter() - t0) / len(v)

    e_d, n_d, _, hist = _batched(lambda x: density_descent(model, x, steps=steps), v, batch)
    diverged = np.concatenate([np.isnan(h).any(0) for h in hist])
    res["naive_density"] = _stats(e_d.numpy(), e_gs, n_d.numpy(), n_gs, tb.dv, diverged)

    _histogram(name, {"latent (Adam)": e.numpy() - e_gs, "latent (L-BFGS)": e_l.numpy() - e_gs,
                      "naive density GD": e_d.numpy() - e_gs}, out / f"ofdft_hist_{name}.png")
    _profiles(name, tb, data["potential"][0], n_gs[0], n.numpy()[0], n_d.numpy()[0],
              out / f"ofdft_density_{name}.png")
    return res


def _histogram(name: str, series: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4))
    for ax, (label, de) in zip(axes, series.items()):
        de = de[np.isfinite(de)]
        clipped = np.clip(de, -0.05, 0.05)
        ax.hist(clipped, bins=50, color="tab:blue" if "latent" in label else "tab:orange")
        for x in (-CHEMICAL_ACCURACY, CHEMICAL_ACCURACY):
            ax.axvline(x, color="red", lw=1)
        ax.set_title(f"{name}: {label}")
        ax.set_xlabel("e_min - e_gs (E0), clipped to +-0.05")
    axes[0].set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _profiles(name, tb, v, n_gs, n_lat, n_naive, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cut = (lambda a: a) if tb.ndim == 1 else (lambda a: a[:, tb.shape[1] // 2, tb.shape[2] // 2])
    x = tb.coordinates()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(x, cut(n_gs), "k-", lw=3, alpha=0.4, label="exact n_gs")
    ax.plot(x, cut(n_lat), "b-", label="latent descent")
    ax.plot(x, cut(n_naive), "r:", label="naive density descent")
    ax2 = ax.twinx()
    ax2.plot(x, cut(v), "g--", lw=0.8)
    ax2.set_ylabel("V (E0)", color="g")
    ax.set_xlabel("x (a0)" + ("" if tb.ndim == 1 else ", line y = z = L/2"))
    ax.set_ylabel("n (1/a0^d)")
    ax.legend(fontsize=7)
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def speed(model_ref: str, grids: list[int], steps: int, repeats: int = 1) -> dict:
    """Seconds per potential: exact diagonalization (eigsh) vs latent descent (Adam, ``steps``).

    On 18^3 the shipped model is timed; larger grids time the same architecture with fresh
    weights (cost depends on the grid, not on the weights).
    """
    out = {}
    for npts in grids:
        tb = cubic_testbed(npts)
        v = tb.sample(11, 0)
        t0 = time.perf_counter()
        for _ in range(repeats):
            ground_state(tb, v)
        t_exact = (time.perf_counter() - t0) / repeats
        if npts == 18:
            model = load_model(model_ref)
        else:
            arch = ARCHITECTURES["gauss3d"]
            pools = (2, 3, 1) if npts % 6 == 0 else (2, 2, 1)
            fpools = (2, 3, 3, 1) if npts % 18 == 0 else (2, 2, 2, 1)
            vae = DensityVAE(tb.shape, tb.dv, tb.length, True, testbed="gauss3d",
                             **{**arch["vae"], "pools": pools})
            fargs = {k: v for k, v in arch["functional"].items()
                     if k not in ("standardize_input", "gradient_features")}
            fn = FunctionalCNN(tb.shape, tb.dv, True, testbed="gauss3d",
                               **{**fargs, "pools": fpools, "gradient_scale": 1.0})
            model = OFDFTModel.from_parts(vae, fn)
        vt = torch.as_tensor(v, dtype=torch.float32)[None]
        t0 = time.perf_counter()
        latent_descent(model, vt, steps=steps, tol=0.0)
        t_lat = time.perf_counter() - t0
        out[f"{npts}^3"] = {"exact_eigsh_s": t_exact, "latent_descent_s": t_lat,
                            "latent_steps": steps, "ratio_latent_over_exact": t_lat / t_exact}
    return out


def beta_scan(name: str, betas: list[float], n_train: int, epochs: int, n_test: int,
              workdir: Path, out: Path) -> dict:
    """Reconstruction error int |D(E(n)) - n| on test densities vs beta (the paper's Fig. 2).

    Trains one VAE per beta (resumable under ``workdir/beta-scan``) on the first ``n_train``
    training instances with the testbed's architecture.
    """
    tb = get_testbed(name)
    data = load_dataset(workdir / "data" / name / "train", limit=n_train)
    test = load_dataset(generate_dataset(name, workdir / "data" / name / "test", n_test,
                                         seed=1, progress=False), limit=n_test)
    n_test_t = torch.as_tensor(test["density"])
    rows = {}
    for beta in betas:
        vae = train_vae(tb, data, workdir / "beta-scan" / name / f"beta{beta:g}", beta=beta,
                        epochs=epochs, progress=False)
        with torch.no_grad():
            rec = vae.decode(vae.encode(n_test_t)[0]).numpy()
        err = integrated_density_error(rec, test["density"], tb.dv)
        rows[f"{beta:g}"] = {"mean": float(err.mean()), "std": float(err.std())}
        print(f"  {name} beta={beta:g}: int|n_rec - n| = {err.mean():.4f} +- {err.std():.4f}")
    return rows


def _plot_beta(scan: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, rows in scan.items():
        b = [float(k) for k in rows]
        ax.errorbar(b, [r["mean"] for r in rows.values()], [r["std"] for r in rows.values()],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("beta")
    ax.set_ylabel("mean int |n_rec - n| (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbeds", nargs="*", default=["gauss3d", "gauss1d", "speckle1d"])
    p.add_argument("--models", nargs="*", default=None,
                   help="model per testbed (default: the shipped 'gauss3d', ...)")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="latent/naive descent steps")
    p.add_argument("--lr", type=float, default=None, help="latent Adam learning rate")
    p.add_argument("--lbfgs-steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--val", action="store_true", help="use validation data (for tuning)")
    p.add_argument("--test-seed", type=int, default=1,
                   help="seed of the test potentials (1: the standard set; training uses 0)")
    p.add_argument("--speed-grids", type=int, nargs="*", default=[18, 32, 48])
    p.add_argument("--speed-steps", type=int, default=100)
    p.add_argument("--workdir", default="runs/ofdft")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--beta-scan", nargs="*", default=[],
                   help="1D testbeds for the reconstruction-error-vs-beta scan")
    p.add_argument("--betas", type=float, nargs="+", default=[1e-6, 1e-4, 1e-2, 1.0])
    p.add_argument("--scan-train", type=int, default=2000)
    p.add_argument("--scan-epochs", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = args.models or args.testbeds
    report = {"testbeds": {}, "threads": args.threads}
    suffix = "_val" if args.val else ""
    path = out / f"ofdft{suffix}.json"

    def save() -> None:
        # after every section, so a run stopped part-way keeps what it measured
        path.write_text(json.dumps(report, indent=1))

    for name, ref in zip(args.testbeds, models):
        report["testbeds"][name] = evaluate_testbed(
            name, ref, args.n_test, Path(args.workdir), out, args.steps, args.lr, args.batch,
            args.val, args.lbfgs_steps, args.test_seed)
        _print_table(report["testbeds"][name])
        save()
    if args.speed_grids and "gauss3d" in args.testbeds:
        ref = models[args.testbeds.index("gauss3d")]
        report["speed_3d"] = speed(ref, args.speed_grids, args.speed_steps)
        print("\nspeed (one potential, 1 thread): grid | exact eigsh s | latent descent s "
              f"({args.speed_steps} Adam steps) | ratio")
        for grid, s in report["speed_3d"].items():
            print(f"  {grid:>6} | {s['exact_eigsh_s']:10.3f} | {s['latent_descent_s']:10.3f} | "
                  f"{s['ratio_latent_over_exact']:.2f}")
        save()
    if args.beta_scan:
        print("\nreconstruction error vs beta:")
        report["beta_scan"] = {name: beta_scan(name, args.betas, args.scan_train,
                                               args.scan_epochs, args.n_test,
                                               Path(args.workdir), out)
                               for name in args.beta_scan}
        _plot_beta(report["beta_scan"], out / "ofdft_beta_scan.png")
    save()
    print(f"\nwrote {path}")


def _print_table(r: dict) -> None:
    print(f"\n== {r['testbed']} ({r['split']}, n={r['latent_adam']['n']}) ==  functional MAE on "
          f"exact n: {r['functional_mae_on_exact_density_E0']:.2e} E0;  VAE reconstruction "
          f"int|n_rec-n|: {r['vae_reconstruction_error']:.4f}")
    cols = ["mean_abs_de_E0", "median_abs_de_E0", "mean_de_E0", "mean_density_error",
            "frac_variational_violation_1e-4", "frac_violation_beyond_1mHa",
            "frac_within_chemical_accuracy", "frac_negative_density", "frac_diverged"]
    print(f"{'method':18s}" + "".join(f"{c[:22]:>24s}" for c in cols))
    for method in ("latent_adam", "latent_lbfgs", "naive_density"):
        print(f"{method:18s}" + "".join(f"{r[method][c]:24.5g}" for c in cols))


if __name__ == "__main__":
    main()
