"""Command-line pieces that several commands share (each command's own CLI stays in its module)."""

from __future__ import annotations

import argparse


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--gallery and --threads, shared by core.evaluate and core.final_train."""
    parser.add_argument("--gallery", type=int, default=8, metavar="N",
                        help="Grad-CAM examples per class (default 8; 0: no galleries)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def apply_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
