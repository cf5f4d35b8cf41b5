"""Command-line pieces that several commands share (each command's own CLI stays in its module)."""

from __future__ import annotations

import argparse


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--gallery, the Grad-CAM options and --threads, shared by core.evaluate and core.final_train."""
    parser.add_argument("--gallery", type=int, default=8, metavar="N",
                        help="Grad-CAM examples per class (default 8; 0: no Grad-CAM at all)")
    add_gradcam_options(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def add_gradcam_options(parser: argparse.ArgumentParser) -> None:
    """--gradcam-layer and --gradcam-method (core.evaluate, core.final_train, core.predict)."""
    parser.add_argument("--gradcam-layer", choices=("layer2", "layer3", "layer4"),  # core.model.GRADCAM_LAYERS
                        help="residual stage Grad-CAM looks at (default: chosen by the model's image size, "
                             "see core.gradcam.choose_layer)")
    parser.add_argument("--gradcam-method", choices=("gradcam", "guided"),
                        help="heat maps by Captum LayerGradCam ('gradcam') or GuidedGradCam ('guided': guided "
                             "backpropagation times Grad-CAM, pixel-level); default: core.gradcam.DEFAULT_METHOD")


def apply_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
