"""The README's main job: runs the flagship example on the shipped default model.

Until a trained model ships, this runs the core tour (examples/core_tour.py).
"""

import runpy
from pathlib import Path

HERE = Path(__file__).parent

if __name__ == "__main__":
    runpy.run_path(str(HERE / "core_tour.py"), run_name="__main__")
