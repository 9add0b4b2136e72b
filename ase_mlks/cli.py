"""``ase-mlks`` command line: list shipped models, and run sub-commands of the sub-packages.

    ase-mlks models                 # shipped models with their metadata
    ase-mlks reference ...          # GPAW reference pipeline (python -m ase_mlks.reference)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .core.checkpoint import PRETRAINED_DIR, load_checkpoint
from .core.errors import CheckpointError

SUBCOMMANDS = {"reference": "ase_mlks.reference.__main__"}


def list_models() -> int:
    """Print one line per shipped checkpoint: name, class, data hash, creation date."""
    files = sorted(PRETRAINED_DIR.glob("*.pt"))
    if not files:
        print("no shipped models")
    for path in files:
        try:
            meta = load_checkpoint(path)
            print(f"{path.stem:32s} {meta['model_class'].rsplit('.', 1)[-1]:24s} "
                  f"{meta.get('created', '?'):26s} {str(meta.get('data_hash'))[:20]}")
        except CheckpointError as err:
            print(f"{path.stem:32s} UNREADABLE: {err}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(module.main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="ase-mlks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["models", *SUBCOMMANDS])
    args = parser.parse_args(argv)
    if args.command == "models":
        return list_models()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
