"""Class probabilities of a trained model for image files, optionally with Grad-CAM overlays.

    python -m core.predict results/<sweep>/final/model.pt lesion1.jpg lesion2.png [--json] [--gradcam DIR]

Images are decoded at the model's image size and normalised exactly as in training. The table (or
``--json``) gives the predicted class, its probability and every class's probability; ``--gradcam
DIR`` saves ``DIR/<image name>_gradcam.png``, the heat map of the predicted class over the image.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import run_cli

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
    parser = argparse.ArgumentParser(
        prog="python -m core.predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  python -m core.predict results/demo/final/model.pt a.jpg b.jpg --gradcam overlays/")
    parser.add_argument("checkpoint", help="a model file (model.pt of core.final_train, best.pt of core.train)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gradcam", metavar="DIR", help="save a Grad-CAM overlay of each image into DIR")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    if args.gradcam:
        from core.state_files import check_output_dir

        check_output_dir(args.gradcam, "--gradcam")

    from core.image_cache import decode_image
    from core.inference import load_for_inference

    loaded = load_for_inference(args.checkpoint, args.device)
    class_names = list(loaded.class_names)
    size = int(loaded.meta["image_size"])
    # Every image is read before any work, so a bad one fails the command at once, by name.
    images = np.stack([decode_image(path, size) for path in args.images])
    probs = loaded.predict(images)
    if args.gradcam:
        from core.gradcam import gradcam_maps, save_overlay

        out = Path(args.gradcam)
        maps = gradcam_maps(loaded.model, images, [int(p.argmax()) for p in probs], loaded.device)
        for image, heat, name in zip(images, maps, overlay_names(args.images)):
            save_overlay(image, heat, out / name)
        log.info("Grad-CAM overlays of the predicted classes in %s", out)
    if args.json:
        print(json.dumps(predictions_json(args.images, probs, class_names), indent=2))
    else:
        print(format_table(args.images, probs, class_names))
    return 0


if __name__ == "__main__":
    run_cli(main)
