"""Run by test_core_training under torchrun (and once without): tiny regression, fixed seed."""

import sys

import torch

from ase_mlks.core.checkpoint import CheckpointMixin
from ase_mlks.core.training import Trainer


class Linear(torch.nn.Module, CheckpointMixin):
    def __init__(self):
        super().__init__()
        self.hparams = {}
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x)


def loss_fn(model, batch):
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    loss = torch.mean((model(x).squeeze(-1) - y) ** 2)
    return loss, {}


def main(workdir: str, optimizer: str = "sgd") -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    data = list(zip(x, y))
    torch.manual_seed(0)
    model = Linear()
    # L-BFGS is a full-batch method: one global batch of all 32 points.
    batch = 32 if optimizer == "lbfgs" else 8
    lr = 1.0 if optimizer == "lbfgs" else 0.05
    trainer = Trainer(model, loss_fn, data, None, batch_size=batch, lr=lr, max_epochs=3,
                      workdir=workdir, seed=1, progress=False, optimizer=optimizer)
    trainer.fit()
    if trainer.rank == 0:
        torch.save(model.state_dict(), f"{workdir}/final.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
