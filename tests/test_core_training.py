"""Shared Trainer: learning, resume, and DDP (2 gloo processes) == 1 process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ase_mlks.core.checkpoint import load_checkpoint

HERE = Path(__file__).parent


def _run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, *args], env=env, timeout=300, capture_output=True,
                          text=True)
    # a failure must show the child's own error, not only "exit status 1"
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}"


def _free_port() -> str:
    """A port nothing listens on now (a fixed one may be taken, e.g. by a parallel run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_ddp_two_processes_match_single_process(tmp_path, optimizer):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    _run([str(HERE / "ddp_train_script.py"), str(single), optimizer])
    _run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
          str(HERE / "ddp_train_script.py"), str(multi), optimizer])
    a = torch.load(single / "final.pt")
    b = torch.load(multi / "final.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)
    # and training did something
    assert load_checkpoint(single / "best.pt")["extra"]["epoch"] >= 1


def test_fit_learns_and_resumes(tmp_path):
    sys.path.insert(0, str(HERE))
    from ddp_train_script import Linear, loss_fn

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    data = list(zip(x, y))
    from ase_mlks.core.training import Trainer

    t = Trainer(Linear(), loss_fn, data[:48], data[48:], batch_size=16, lr=0.05,
                max_epochs=4, workdir=tmp_path, progress=False)
    hist = t.fit()
    assert len(hist) == 4 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    t2 = Trainer(Linear(), loss_fn, data[:48], data[48:], batch_size=16, lr=0.05,
                 max_epochs=8, workdir=tmp_path, progress=False)
    assert t2.epoch == 4  # resumed from last.pt
    hist2 = t2.fit()
    assert len(hist2) == 8 and hist2[-1]["val_loss"] <= hist[-1]["val_loss"]
    lines = (tmp_path / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 8


def test_lbfgs_full_batch_solves_least_squares(tmp_path):
    """L-BFGS on the whole (noise-free, linear) data set reaches the exact solution."""
    sys.path.insert(0, str(HERE))
    from ddp_train_script import Linear, loss_fn

    from ase_mlks.core.training import Trainer

    torch.manual_seed(0)
    x = torch.randn(40, 4)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    data = list(zip(x, x @ w + 0.3))
    model = Linear()
    hist = Trainer(model, loss_fn, data, None, batch_size=40, optimizer="lbfgs", lr=1.0,
                   max_epochs=3, workdir=tmp_path, progress=False).fit()
    assert hist[0]["train_loss"] > 1.0  # the first record is the starting point
    torch.testing.assert_close(model.lin.weight[0].detach(), w, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.lin.bias.detach(), torch.tensor([0.3]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="weight_decay"):
        Trainer(model, loss_fn, data, batch_size=40, optimizer="lbfgs", weight_decay=0.1,
                workdir=tmp_path / "wd", progress=False)
    with pytest.raises(ValueError, match="grad_clip"):
        Trainer(model, loss_fn, data, batch_size=40, optimizer="lbfgs", grad_clip=1.0,
                workdir=tmp_path / "gc", progress=False)


def test_batch_not_divisible_by_world_size_is_rejected(monkeypatch):
    from ase_mlks.core import training
    monkeypatch.setattr(training, "distributed_context", lambda: (0, 3))
    with pytest.raises(ValueError, match="not divisible"):
        training.Trainer(torch.nn.Linear(1, 1), lambda m, b: (None, {}), [1], batch_size=8,
                         progress=False, resume=False, workdir="/tmp/unused")


def test_cosine_schedule_runs_its_budget_and_keeps_the_final_model(tmp_path):
    """schedule='cosine': the rate falls from lr to min_lr over max_epochs, training does not
    stop early, and the model returned is the last one (not the best-by-loss)."""
    sys.path.insert(0, str(HERE))
    from ddp_train_script import Linear, loss_fn

    from ase_mlks.core.training import Trainer

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = list(zip(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0])))
    model = Linear()
    t = Trainer(model, loss_fn, data, None, batch_size=8, lr=0.05, min_lr=1e-4, max_epochs=6,
                patience=1, schedule="cosine", workdir=tmp_path, progress=False)
    hist = t.fit()
    lrs = [h["lr"] for h in hist]
    assert len(hist) == 6 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(1e-4)
    last = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, last[key])
    with pytest.raises(ValueError, match="schedule"):
        Trainer(model, loss_fn, data, batch_size=8, schedule="step", workdir=tmp_path / "x",
                progress=False)
