"""Class probabilities of a trained model for image files, optionally with Grad-CAM overlays.

    python -m core.predict results/<sweep>/final/model.pt lesion1.jpg lesion2.png [--json] [--gradcam DIR] [--tta]
        [--masks MASK_DIR] [--gradcam-layer LAYER] [--age 55 --sex female --site back]

Images are decoded at the model's image size and normalised exactly as in training. Probabilities are
calibrated with the temperature core.final_train fitted on the validation split and stored in model.pt
(``--no-calibration``: the raw model's); ``--tta`` averages them over the 8 flips and quarter turns of
each image (with the temperature fitted for that). The table (or
``--json``) gives the predicted class, its probability and every class's probability; ``--gradcam
DIR`` saves ``DIR/<image name>_gradcam.png``, the heat map of the predicted class over the image.
With ``--masks MASK_DIR`` (holding ``<image name>_segmentation.png`` or ``<image name>.png``, the
image's size) each map is also scored against the lesion mask, whose outline the overlay draws:
the share of the map inside the lesion and whether its peak is (core/explain/mask_scores.py).

``--json`` gives each image's lesion box (``box``: ``pixels`` of the image file as shown, x0, y0, x1, y1, and
``fractions`` of its sides): the box head's (a model trained with ``box_loss_weight`` > 0), else, with
``--gradcam``, the Grad-CAM map's (core/explain/cam_boxes.py, at the threshold stored in model.pt); else null.
Each image is also checked (core/model/checked_prediction.py): ``ood`` says whether it looks like the training images
(the out-of-distribution score and threshold fitted on the validation split, from the same forward pass) and
``abstain`` whether the model answers (``--coverage``: the share of validation images answered, default the
model file's, 90%); the table's notes name the images not answered and why. A model file without the statistics
says "no out-of-distribution check in this model file".

This module is the command: reading the images, the table and the JSON it prints; the model is used through
core/model/inference.py, Grad-CAM through core/explain/gradcam.py.

A model trained with clinical fields (config key ``metadata``) takes ``--age``, ``--sex`` and ``--site``
(the same for every image given); a field left out counts as unknown (all of them: with a warning).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from core.model.checked_prediction import predict_checked
from core.cli import add_coverage_option, add_device_option, add_gradcam_options, add_prediction_options, coverage_of
from core.errors import UserError, run_cli
from core.model.box_head import capture_boxes, view_boxes
from core.explain.mask_scores import masks_summary_line, score_one_map
from core.data.lesion_boxes import box_answer, upright_size
from core.data.image_cache import decode_image
from core.model.inference import LoadedModel
from core.model.loading import load_for_inference
from core.data.masks import read_masks
from core.model.fields import SEXES, SITES, validate_record
from core.model.networks import check_gradcam_layer
from core.io.state_files import check_output_dir

log = logging.getLogger(__name__)


def format_table(paths: Sequence[str], probs: np.ndarray, class_names: Sequence[str]) -> str:
    """A plain-text table: image, prediction, confidence, then one column per class."""
    name_width = max([len("image"), *(len(p) for p in paths)])
    class_width = max([len("prediction"), *(len(c) for c in class_names)])
    prob_widths = [max(6, len(c)) for c in class_names]
    header = (f"{'image':<{name_width}}  {'prediction':<{class_width}}  {'conf':>6}  "
              + "  ".join(f"{c:>{w}}" for c, w in zip(class_names, prob_widths)))
    rows = [header, "-" * len(header)]
    for path, p in zip(paths, probs):
        top = int(p.argmax())
        rows.append(f"{path:<{name_width}}  {class_names[top]:<{class_width}}  {p[top]:>6.3f}  "
                    + "  ".join(f"{v:>{w}.3f}" for v, w in zip(p, prob_widths)))
    return "\n".join(rows)


def predictions_json(paths: Sequence[str], probs: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    return [{"image": path, "prediction": class_names[int(p.argmax())], "confidence": float(p.max()),
             "probabilities": {name: float(v) for name, v in zip(class_names, p)}}
            for path, p in zip(paths, probs)]


def check_lines(paths: Sequence[str], checked: Sequence[dict]) -> str:
    """Under the table: each image the model abstains on, and why; or that the model file has no check."""
    lines = [f"{path}: not answered: {check['abstain']['detail']}" for path, check in zip(paths, checked)
             if check["abstain"]["abstained"]]
    if checked and checked[0]["ood"]["in_distribution"] is None:
        lines.append(checked[0]["ood"]["note"])
    return "\n".join(lines) if lines else "every image answered (like the training images, confident enough)"


def overlay_names(paths: Sequence[str]) -> list[str]:
    """``<stem>_gradcam.png`` per image; images of the same name from different folders get a number."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(f"{stem}_gradcam.png" if count == 0 else f"{stem}-{count + 1}_gradcam.png")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    record = clinical_record(args)  # a bad value fails before any work
    if args.gradcam:
        check_output_dir(args.gradcam, "--gradcam")
    if args.masks and not args.gradcam:
        raise UserError("--masks scores Grad-CAM maps: give --gradcam DIR as well")
    loaded = load_for_inference(args.checkpoint, args.device)
    if args.gradcam:
        check_gradcam_layer(loaded.arch, args.gradcam_layer)  # a layer the model's arch lacks fails before any work
    size = int(loaded.header["image_size"])
    # Every image is read before any work, so a bad one fails the command at once, by name.
    images = np.stack([decode_image(path, size) for path in args.images])
    masks = read_masks(args.images, args.masks, size) if args.masks else [None] * len(images)
    clinical = encoded_clinical(loaded, record, len(images))
    with capture_boxes(loaded.model) as got:  # the box head's boxes, from the same forward pass
        probs, checked = predict_checked(loaded, images, tta=args.tta, calibrated=not args.no_calibration,
                                         clinical=clinical, coverage=coverage_of(args))
    boxes = view_boxes(got, args.tta)
    temperature = loaded.temperature(args.tta)
    log.info("probabilities %s%s", "with TTA (8 views), " if args.tta else "",
             "not calibrated (--no-calibration)" if args.no_calibration else
             "not calibrated: the model file holds no temperature" if temperature is None else
             f"calibrated (temperature {temperature:.3f}, fitted on the validation split)")
    rows = predictions_json(args.images, probs, list(loaded.class_names))
    # "ood", "abstain" and an ensemble's "disagreement" (core/model/checked_prediction.py)
    for row, check in zip(rows, checked):
        row.update(check)
    sizes = [upright_size(path) for path in args.images]
    for row, size, box in zip(rows, sizes, [None] * len(rows) if boxes is None else boxes):
        row["box"] = box_answer(box, *size, "box head")
    scores = _overlays(args, loaded, (images, clinical), probs, masks, rows, sizes) if args.gradcam else None
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(args.images, probs, list(loaded.class_names)))
        print(check_lines(args.images, checked))
        for row in rows:  # an ensemble's members' disagreement, one line per image
            if "disagreement" in row:
                print(f"{row['image']}: {row['disagreement']['words']}")
        if scores:
            print(scores)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  python -m core.predict results/demo/final/model.pt a.jpg b.jpg --gradcam overlays/")
    parser.add_argument("checkpoint", help="a model file (model.pt of core.final_train, best.pt of core.train)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gradcam", metavar="DIR", help="save a Grad-CAM overlay of each image into DIR")
    parser.add_argument("--masks", metavar="MASK_DIR",
                        help="lesion masks (<image name>_segmentation.png or <image name>.png): score each "
                             "Grad-CAM map against its image's mask (with --gradcam)")
    add_gradcam_options(parser)
    add_device_option(parser)
    add_prediction_options(parser)
    add_coverage_option(parser, default=None)
    add_clinical_options(parser)
    return parser


def add_clinical_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--age", help="patient's age in years (a model trained with clinical fields; else ignored)")
    parser.add_argument("--sex", help=f"patient's sex: {', '.join(SEXES)} or unknown")
    parser.add_argument("--site", help=f"anatomical site: {', '.join(SITES)} or unknown")


def clinical_record(args: argparse.Namespace) -> dict | None:
    """The checked --age/--sex/--site; None when none was given."""
    given = {"age": args.age, "sex": args.sex, "site": args.site}
    if all(value is None for value in given.values()):
        return None
    try:
        return validate_record(given)
    except UserError as exc:
        raise UserError(f"--{str(exc).split(chr(39))[1]}: {exc}") from None


def encoded_clinical(loaded: LoadedModel, record: dict | None, n: int) -> np.ndarray | None:
    """The record encoded for each of ``n`` images; None for an image-only model (the record ignored)."""
    if record is None or loaded.fusion is None:
        if record is not None:
            log.warning("the model was trained without clinical fields: --age/--sex/--site are ignored")
        return None
    return loaded.encode([record] * n)


def _overlays(args: argparse.Namespace, loaded: LoadedModel, inputs: tuple[np.ndarray, np.ndarray | None],
              probs: np.ndarray, masks: Sequence[np.ndarray | None], rows: list[dict],
              sizes: Sequence[tuple[int, int]]) -> str | None:
    """Each image's overlay of the predicted class's map into --gradcam, noted in its row with the map's box (in
    pixels of the image; also the row's ``box`` where the model has no box head); with --masks, the line that
    scores the maps against the masks. ``inputs``: the images and the clinical fields they were predicted with."""
    from core.explain.cam_boxes import cam_boxes, stored_fraction
    from core.explain.gradcam import DEFAULT_METHOD, gradcam_maps, save_overlay

    out, (images, clinical) = Path(args.gradcam), inputs
    maps = gradcam_maps(loaded.model, images, [int(p.argmax()) for p in probs], loaded.device,
                        layer=args.gradcam_layer, method=args.gradcam_method or DEFAULT_METHOD, clinical=clinical)
    boxes = cam_boxes(maps, stored_fraction(loaded.header))
    for image, heat, name, mask, row, box, size in zip(images, maps, overlay_names(args.images), masks, rows, boxes,
                                                       sizes):
        save_overlay(image, heat, out / name, mask=mask)
        row["gradcam"] = {"overlay": str(out / name), **score_one_map(heat, mask),
                          "box": box_answer(box, *size, "Grad-CAM")}
        row["box"] = row["box"] or row["gradcam"]["box"]
    log.info("Grad-CAM overlays of the predicted classes in %s", out)
    return masks_summary_line(maps, masks) if args.masks else None


if __name__ == "__main__":
    run_cli(main)
