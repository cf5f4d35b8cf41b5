"""Command-line options that several commands share, each stated once (each command's own stay in its module).

core.final_train and core.evaluate take all of them; core.predict takes the Grad-CAM, device and prediction
options. Choices come from where the values are defined: devices from core.config, Grad-CAM layers from
core.model.networks.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from core.evaluation.bootstrap import DEFAULT_RESAMPLES
from core.evaluation.sections import SectionOptions
from core.config import DEVICES
from core.errors import UserError
from core.model.networks import ALL_GRADCAM_LAYERS

if TYPE_CHECKING:  # core.explain.gradcam imports Captum: only when Grad-CAM runs
    from core.explain.gradcam import GradcamOptions

# core.explain.gradcam.METHODS, stated here too so that --help does not import Captum (tests/test_evaluate_predict.py
# checks that the two agree).
GRADCAM_METHODS = ("gradcam", "guided")
DEFAULT_GALLERY = 8


def add_gallery_options(parser: argparse.ArgumentParser) -> None:
    """--gallery and the Grad-CAM options (core.evaluate, core.final_train)."""
    parser.add_argument("--gallery", type=int, default=DEFAULT_GALLERY, metavar="N",
                        help=f"Grad-CAM examples per class (default {DEFAULT_GALLERY}; 0: no Grad-CAM at all)")
    add_gradcam_options(parser)


def add_gradcam_options(parser: argparse.ArgumentParser) -> None:
    """--gradcam-layer and --gradcam-method (core.evaluate, core.final_train, core.predict)."""
    parser.add_argument("--gradcam-layer", choices=ALL_GRADCAM_LAYERS, metavar="LAYER",
                        help="the layer Grad-CAM looks at: a ResNet's layer2, layer3 or layer4; features[-1] "
                             "(EfficientNet, MobileNetV3, ConvNeXt: their only choice); trunk_output (RegNet: "
                             "its only choice). Default: chosen by the model's arch and image size (see "
                             "core.explain.gradcam.choose_layer)")
    parser.add_argument("--gradcam-method", choices=GRADCAM_METHODS,
                        help="heat maps by Captum LayerGradCam ('gradcam') or GuidedGradCam ('guided': guided "
                             "backpropagation times Grad-CAM, pixel-level); default: core.explain.gradcam.DEFAULT_METHOD")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device (core.evaluate, core.predict; core.final_train takes the config's ``device``)."""
    parser.add_argument("--device", choices=DEVICES, default=DEVICES[0],
                        help=f"where the model runs (default {DEVICES[0]}: CUDA when available)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


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
    add_prediction_options(parser)
    parser.add_argument("--positive-class", metavar="CLASS",
                        help="class of the operating points (sensitivity/specificity; default: mel when a class)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                        help=f"resamples of the bootstrap over lesions for 95%% intervals "
                             f"(default {DEFAULT_RESAMPLES}; 0: none)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED",
                        help="seed of the bootstrap's resamples (default 0)")


def section_options(args: argparse.Namespace) -> SectionOptions:
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap}: the number of resamples must be >= 0")
    return SectionOptions(tta=args.tta, calibrated=not args.no_calibration, positive_class=args.positive_class,
                           resamples=args.bootstrap, seed=args.bootstrap_seed)


def gradcam_options(args: argparse.Namespace) -> GradcamOptions:
    """--gallery, --gradcam-layer and --gradcam-method as a core.explain.gradcam.GradcamOptions."""
    from core.explain.gradcam import DEFAULT_METHOD, GradcamOptions

    return GradcamOptions(per_class=args.gallery, layer=args.gradcam_layer,
                          method=args.gradcam_method or DEFAULT_METHOD)


def add_coverage_option(parser: argparse.ArgumentParser, default: float | None = 0.9) -> None:
    """--coverage: the share of images the abstention rule answers (core/model/abstain.py; core.final_train chooses its
    threshold on the validation split; core.evaluate, core.predict and the server may ask for another)."""
    parser.add_argument("--coverage", type=float, default=default, metavar="SHARE",
                        help="abstain on the least sure images so that this share of validation images is answered "
                             + (f"(default {default})" if default is not None else "(default: the one stored in the "
                                                                                     "model file, 0.9 unless chosen)"))


def coverage_of(args: argparse.Namespace) -> float | None:
    from core.model.abstain import check_coverage

    return None if args.coverage is None else check_coverage(args.coverage)
