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
(core/clinical.py).

The evaluation itself (metrics, metrics.json, figures) is core/evaluation.py, shared with core.final_train.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from core import filenames
from core.atomic import write_json
from core.cli import add_evaluation_options, add_run_options, apply_threads, clinical_options
from core.errors import UserError, run_cli
from core.state_files import check_output_dir

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Writes metrics.json, confusion_matrix.png, roc_curves.png, reliability_diagram.png, "
               "gradcam_<class>.png, gradcam/ and report.md into --out.\n\nexample:\n  python -m core.evaluate "
               "results/demo/final/model.pt --data ../isic2018-test --split all --out results/demo/external")
    parser.add_argument("checkpoint", help="a model file (model.pt of core.final_train, best.pt of core.train)")
    parser.add_argument("--data", required=True, help="dataset folder (or CSV) in a supported layout")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=("test", "all"), default="test",
                        help="the test split only (default) or every image (an external test set)")
    parser.add_argument("--splits", help="a splits.csv to take the split from (e.g. the training run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_run_options(parser)
    add_evaluation_options(parser)
    args = parser.parse_args(argv)
    out = check_output_dir(args.out, "--out")
    apply_threads(args.threads)
    options = clinical_options(args)

    from core.clinical import (evaluate_clinically, headline_intervals, interval_note, predict_set, report_tables,
                               write_reliability)
    from core.data import load_dataset
    from core.evaluation import evaluate_probs, explainable, headline, map_labels, metrics_document, write_figures
    from core.gradcam import DEFAULT_METHOD, GradcamOptions
    from core.inference import load_for_inference
    from core.operating_points import positive_index
    from core.report import ReportInput, write_report

    loaded = load_for_inference(args.checkpoint, args.device)
    model, meta, cfg, device = loaded.model, loaded.meta, loaded.config, loaded.device
    model_classes = loaded.class_names
    positive_index(model_classes, options.positive_class)  # a class the model lacks fails before any work
    # --split all needs no test split: asking for one would fail on a small external set for no reason.
    test_fraction = cfg.test_fraction if args.split == "test" else 0.0
    data = load_dataset(args.data, cfg.image_size, val_fraction=cfg.val_fraction, test_fraction=test_fraction,
                        split_seed=cfg.split_seed, splits_file=args.splits)
    idx = np.arange(len(data.labels)) if args.split == "all" else data.indices("test")
    if len(idx) == 0:
        raise UserError(f"{args.data}: the test split is empty; use --split all for a dataset held out as a whole")
    labels = map_labels(data.class_names, model_classes, data.labels[idx], args.data)
    images = np.asarray(data.images[idx])
    log.info("evaluating %s on %d images of %s (%s split%s)", args.checkpoint, len(idx), data.root, args.split,
             ", with TTA" if args.tta else "")
    predicted = predict_set(loaded, images, data, idx, labels, args.tta)
    clinical = evaluate_clinically(predicted, model_classes, meta, options)
    ev = evaluate_probs(labels, clinical.probs, model_classes)

    out.mkdir(parents=True, exist_ok=True)
    (out / filenames.EVALUATION).unlink(missing_ok=True)  # an earlier evaluation's; this one's is written last
    what = f"{args.split} split of {Path(data.root).name}" if args.split == "test" else f"all of {Path(data.root).name}"
    gradcam = GradcamOptions(per_class=args.gallery, layer=args.gradcam_layer,
                             method=args.gradcam_method or DEFAULT_METHOD)
    figures, explained = write_figures(out, ev, what, model, device, explainable(ev, images, data, idx), gradcam)
    figures.append(write_reliability(out, clinical, what))
    source = {"model": str(Path(args.checkpoint).resolve()), "split": args.split,
              "data": {"path": data.root, "layout": data.layout, "fingerprint": data.fingerprint,
                       "class_names": list(data.class_names)}}
    document = metrics_document(ev, source, gradcam=explained.document, clinical=clinical.sections)
    write_report(out / filenames.REPORT, ReportInput(
        title=f"Evaluation of {Path(args.checkpoint).name} on {Path(data.root).name}",
        facts=[("model", f"`{source['model']}` (epoch {meta.get('epoch', '?')}, {len(model_classes)} classes, "
                         f"{meta['image_size']} px)"),
               ("data", f"`{data.root}` ({data.layout} layout, fingerprint `{data.fingerprint[:12]}`)"),
               ("evaluated", f"{len(idx)} images ({args.split} split)"),
               ("classes matched by name", ", ".join(sorted({data.class_names[i] for i in
                                                               np.unique(data.labels[idx])})))],
        metrics=ev.metrics, per_class=ev.per_class, figures=figures, galleries=explained.galleries,
        config=meta.get("config"), gradcam=explained.document, notes=explained.notes,
        intervals=headline_intervals(document), interval_note=interval_note(document),
        tables=report_tables(document)))
    write_json(out / filenames.EVALUATION, document)  # last: the folder is complete
    print(headline(ev.metrics))
    print(f"report: {out / filenames.REPORT}")
    return 0


if __name__ == "__main__":
    run_cli(main)
