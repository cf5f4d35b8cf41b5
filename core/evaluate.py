"""Evaluate a saved model on a dataset: metrics.json, figures, Grad-CAM galleries and report.md.

    python -m core.evaluate results/<sweep>/final/model.pt --data PATH --out DIR [--split test|all] [--tta]
        [--no-calibration] [--positive-class mel] [--bootstrap 1000]

The dataset may be any supported layout (HAM10000, ISIC 2018 Task 3, ImageFolder), e.g. an external
test set (then use ``--split all``). Its classes are matched to the model's by name: a subset is
fine, a class the model does not know is an error. Images are decoded at the model's image size and
normalised as in training. ``--split test`` evaluates the test split made with the model's split
settings (pass ``--splits`` with the run's splits.csv to reuse a split exactly).

Probabilities are calibrated with the temperature core.final_train stored in model.pt (``--no-calibration``:
the raw model); ``--tta`` averages the 8 flips and quarter turns and reports without TTA beside it. The
report adds 95% bootstrap intervals over lesions, lesion-level results, ECE and Brier score before and after
calibration, the positive class's operating points at the thresholds stored in model.pt (chosen on the
training data's validation split, never on the images evaluated here) and results per metadata subgroup
(core/evaluation/sections.py), and when not to trust the answer: images unlike the training data and abstention
(core/evaluation/trust.py; ``--fit-ood`` fits the check for a model file without it, core/evaluation/ood_refit.py;
``--coverage`` asks the abstention rule for another share answered).

The evaluation itself (predict, calibrate, evaluation sections, figures, Grad-CAM, report, metrics.json) is
core/evaluation/pipeline.py, shared with core.final_train; this module is the command and what it evaluates.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from core import filenames
from core.cli import (add_coverage_option, add_device_option, add_evaluation_options, add_gallery_options,
                      add_threads_option, apply_threads, section_options, coverage_of, gradcam_options)
from core.data.dataset import SplitOptions, load_dataset
from core.errors import UserError, run_cli
from core.evaluation.pipeline import EvaluatedImages, EvaluationOutputs, ReportPage, data_source, score_images, write_evaluation
from core.model.inference import LoadedModel
from core.model.loading import load_for_inference
from core.evaluation.metrics import headline, map_labels
from core.model.networks import check_gradcam_layer
from core.evaluation.ood_refit import fit_for_file, splits_for_fit
from core.evaluation.operating_points import positive_index
from core.io.state_files import check_output_dir

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = check_output_dir(args.out, "--out")
    apply_threads(args.threads)
    options = section_options(args)
    loaded = load_for_inference(args.checkpoint, args.device)
    if args.fit_ood:  # the run's splits.csv: its val split is what the statistics are fitted on
        args.splits = splits_for_fit(args.checkpoint, args.splits)
    positive_index(loaded.class_names, options.positive_class)  # a class the model lacks fails before any work
    if args.gallery > 0:
        check_gradcam_layer(loaded.arch, args.gradcam_layer)   # so does a Grad-CAM layer its arch lacks
    images = _images(args, loaded)
    data = images.data
    log.info("evaluating %s on %d images of %s (%s split%s)", args.checkpoint, len(images.idx), data.root,
             args.split, ", with TTA" if args.tta else "")
    stored = fit_for_file(loaded, data, args.data, out, args.coverage) if args.fit_ood else loaded.header
    scored = score_images(loaded, images, stored, options)
    source = {"model": str(Path(args.checkpoint).resolve()), "split": args.split, "data": data_source(data)}
    document = write_evaluation(out, scored, EvaluationOutputs(
        source=source, gradcam=gradcam_options(args), page=lambda doc: _page(args, loaded, images, source),
        coverage=coverage_of(args)))
    print(headline(document))
    print(f"report: {out / filenames.REPORT}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Writes metrics.json, confusion_matrix.png, roc_curves.png, reliability_diagram.png, "
               "gradcam_<class>.png, gradcam/, boxes.png and report.md into --out.\n\nexample:\n  python -m core.evaluate "
               "results/demo/final/model.pt --data ../isic2018-test --split all --out results/demo/external")
    parser.add_argument("checkpoint", help="a model file (model.pt of core.final_train, best.pt of core.train)")
    parser.add_argument("--data", required=True, help="dataset folder (or CSV) in a supported layout")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=("test", "all"), default="test",
                        help="the test split only (default) or every image (an external test set)")
    parser.add_argument("--splits", help="a splits.csv to take the split from (e.g. the training run's)")
    add_device_option(parser)
    add_gallery_options(parser)
    add_threads_option(parser)
    add_evaluation_options(parser)
    add_coverage_option(parser, default=None)
    parser.add_argument("--fit-ood", action="store_true",
                        help="fit the out-of-distribution check and the abstention rule on the validation split of "
                             "the run's splits.csv (--splits, else the one beside the model file), for a model file "
                             "without them; writes the model file with them into --out (core/evaluation/ood_refit.py)")
    return parser


def _images(args: argparse.Namespace, loaded: LoadedModel) -> EvaluatedImages:
    """The images ``--split`` names, decoded at the model's size, with their classes matched to the model's."""
    cfg = loaded.config
    # --split all needs no test split: asking for one would fail on a small external set for no reason.
    test_fraction = cfg.test_fraction if args.split == "test" else 0.0
    splits = SplitOptions(cfg.val_fraction, test_fraction, cfg.split_seed, args.splits)
    data = load_dataset(args.data, cfg.image_size, splits)
    idx = np.arange(len(data.labels)) if args.split == "all" else data.indices("test")
    if len(idx) == 0:
        raise UserError(f"{args.data}: the test split is empty; use --split all for a dataset held out as a whole")
    labels = map_labels(data.class_names, loaded.class_names, data.labels[idx], args.data)
    name = Path(data.root).name
    what = f"{args.split} split of {name}" if args.split == "test" else f"all of {name}"
    return EvaluatedImages(data, idx, labels, what)


def _page(args: argparse.Namespace, loaded: LoadedModel, images: EvaluatedImages,
          source: Mapping[str, Any]) -> ReportPage:
    header, data, idx = loaded.header, images.data, images.idx
    return ReportPage(
        title=f"Evaluation of {Path(args.checkpoint).name} on {Path(data.root).name}",
        facts=[("model", f"`{source['model']}` (epoch {header.get('epoch', '?')}, {len(loaded.class_names)} classes, "
                         f"{header['image_size']} px)"),
               ("data", f"`{data.root}` ({data.layout} layout, fingerprint `{data.fingerprint[:12]}`)"),
               ("evaluated", f"{len(idx)} images ({args.split} split)"),
               ("classes matched by name", ", ".join(sorted({data.class_names[i] for i in
                                                               np.unique(data.labels[idx])}))),
               *([("out-of-distribution check", f"fitted here on the validation split of `{args.splits}` "
                   f"(--fit-ood); the model file with it: `{Path(args.out) / 'model.pt'}`")] if args.fit_ood else [])],
        config=header.get("config"))


if __name__ == "__main__":
    run_cli(main)
