"""``python -m core.data.dataset``: what a dataset holds, per split and class (core/data/dataset.py's command)."""

from core.errors import run_cli
from core.data.dataset import main

if __name__ == "__main__":
    run_cli(main)
