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


def add_prediction_options(parser: argparse.ArgumentParser) -> None:
    """--tta and --no-calibration, shared by core.evaluate, core.final_train and core.predict."""
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the softmax over the 8 flips and quarter turns")
    parser.add_argument("--no-calibration", action="store_true",
                        help="the raw model's probabilities, without the temperature fitted on the validation split")


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """Prediction options, plus --positive-class and the bootstrap of core.evaluate and core.final_train."""
    from core.bootstrap import DEFAULT_RESAMPLES

    add_prediction_options(parser)
    parser.add_argument("--positive-class", metavar="CLASS",
                        help="class of the operating points (sensitivity/specificity; default: mel when a class)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                        help=f"resamples of the bootstrap over lesions for 95%% intervals "
                             f"(default {DEFAULT_RESAMPLES}; 0: none)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED",
                        help="seed of the bootstrap's resamples (default 0)")


def clinical_options(args: argparse.Namespace):  # -> core.clinical.ClinicalOptions
    from core.clinical import ClinicalOptions
    from core.errors import UserError

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap}: the number of resamples must be >= 0")
    return ClinicalOptions(tta=args.tta, calibrated=not args.no_calibration, positive_class=args.positive_class,
                           resamples=args.bootstrap, seed=args.bootstrap_seed)
