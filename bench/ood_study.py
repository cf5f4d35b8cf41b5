"""Does the model say when not to trust it? Out-of-distribution detection and abstention on the HAM10000 copy.

    python -m bench.ood_study --out ood_study.json      # HAM10000 copy, 64 px, 3 epochs, seeds 0 1 2

For each seed s (``--seeds``) the dataset is split by lesion with ``split_seed`` = s and two ResNet-18s train
``--epochs`` epochs at ``--image-size`` px from scratch (``pretrained=none``: no ImageNet weights offline):

- the full model: its temperature, out-of-distribution statistics and abstention rule fitted on the validation
  split as core.final_train fits them (core/model/checked_prediction.py ``fit_checks``), then the evaluation's
  sections (core/evaluation/trust.py) on the test split: AUROC and FPR@95 of each score (Mahalanobis, max-softmax,
  energy) against the far-out sets (scikit-image's and scikit-learn's photos, synthetic images) and the shifted
  lesions (blurred, JPEG quality 10, colour-cast, rotated); and the balanced accuracy when the least sure 10% of
  test images are abstained on (the surest 90% answered) against all answered;
- the near-out model: the same with one class left out of every split (``--leave-out``, default df); the
  left-out class's images (never seen in training) are then scored against its test split.

Then the per-request cost of the check: one 1-image prediction with and without the captured features and the
checks (median of ``--repeats``). Prints the table (mean +- sd over seeds); ``--out`` writes every figure as JSON.
Runs on ``../shared/data/ham10000-200x150`` when it is there, else generated data.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.common import BenchData, result_header, study_data, study_parser, write_result, work_folder
from bench.sweep_runs import mean_sd
from core.io import atomic
from core.errors import UserError, run_cli

log = logging.getLogger(__name__)

SCORES = ("mahalanobis", "max_softmax", "energy")
ROWS = ("natural_photos", "synthetic", "far_out", "blur", "jpeg_q10", "colour_cast", "rotated", "near_out")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    source = study_data(args, f"near-out class {args.leave_out}")
    started = time.time()
    runs, cost = [], None
    with work_folder(None, "bench-ood-") as root:
        for seed in args.seeds:
            run = run_seed(seed, args, source.path, root)
            if cost is None:   # measured once, on the first seed's model
                cost = request_cost(root / f"seed{seed}" / "full" / "best.pt", run.pop("fitted"), args)
            run.pop("fitted", None)
            runs.append(run)
            print(_seed_line(runs[-1]), flush=True)
            result = _result(argv, args, source, started, runs, cost)
            if args.out:  # after every seed: a study cut short keeps what it measured
                atomic.write_json(args.out, result)
    print(table(result["summary"]))
    print(f"per-request cost of the check (1 image, {args.image_size} px, CPU, {args.threads} threads): "
          f"{cost['without_ms']:.2f} ms without, {cost['with_ms']:.2f} ms with "
          f"(+{cost['with_ms'] - cost['without_ms']:.2f} ms)")
    write_result(result, args.out)
    return 0


def _result(argv: Sequence[str] | None, args: argparse.Namespace, source: BenchData, started: float,
            runs: list[dict[str, Any]], cost: dict[str, Any] | None) -> dict[str, Any]:
    return {**result_header("bench.ood_study", argv, started, source),
            "settings": {"image_size": args.image_size, "epochs": args.epochs, "seeds": args.seeds,
                         "seeds_done": [r["seed"] for r in runs], "leave_out": args.leave_out, "pretrained": "none",
                         "batch_size": args.batch_size},
            "summary": summarize(runs), "cost": cost, "runs": runs}


def _config(seed: int, args: Any) -> Any:
    from core.config import TrainConfig

    return TrainConfig.from_dict({"image_size": args.image_size, "epochs": args.epochs, "seed": seed,
                                  "split_seed": seed, "pretrained": "none", "device": "cpu",
                                  "batch_size": args.batch_size})


def run_seed(seed: int, args: Any, data_path: Path, root: Path) -> dict[str, Any]:
    from core.data.dataset import load_for_config
    from core.evaluation.trust import trust_sections

    cfg = _config(seed, args)
    data = load_for_config(str(data_path), cfg, masks=False, progress=False)
    if args.leave_out not in data.class_names:
        raise UserError(f"--leave-out {args.leave_out}: not a class of {data_path} ({', '.join(data.class_names)})")
    loaded, fitted, test = _train_and_fit(cfg, data, root / f"seed{seed}" / "full")
    sections = trust_sections(loaded, fitted, test, tta=False)
    rc = sections["abstention"]
    far = sections["ood"]
    rows = {key: far["far_out"][key]["scores"] for key in ("natural_photos", "synthetic", "far_out")}
    rows.update({key: value["scores"] for key, value in far["shifted_lesions"].items()})
    counts = {key: far["far_out"][key]["n"] for key in ("natural_photos", "synthetic", "far_out")}
    counts.update({key: value["n"] for key, value in far["shifted_lesions"].items()})

    # near-out: the class left out of training, scored against that model's own test split
    left = data.class_names.index(args.leave_out)
    sub = _without_class(data, left)
    near_loaded, near_fitted, near_test = _train_and_fit(cfg, sub, root / f"seed{seed}" / "near")
    from core.model import ood
    from core.evaluation.trust import compare, predicted_scores

    unseen = np.asarray(data.images[data.labels == left])
    inside = ood.all_scores(near_fitted["ood"], near_test.features, near_test.logits)
    _, outside = predicted_scores(near_loaded, near_fitted["ood"], unseen, None)
    near = compare(inside, outside, near_fitted["ood"])
    rows["near_out"], counts["near_out"] = near["scores"], near["n"]
    return {"seed": seed, "n_test": int(len(test.labels)), "counts": counts, "scores": rows,
            "test_pass_rate": far["evaluated_pass_rate"],
            "balanced_accuracy": {"all": rc["at"]["1.00"]["balanced_accuracy"],
                                  "surest_90": rc["at"]["0.90"]["balanced_accuracy"],
                                  "surest_80": rc["at"]["0.80"]["balanced_accuracy"]},
            "aurc": rc["aurc"], "rule": rc["rule"],
            "shifted_balanced_accuracy": {k: v["balanced_accuracy"] for k, v in far["shifted_lesions"].items()},
            "fitted": fitted}


def _train_and_fit(cfg: Any, data: Any, out: Path) -> tuple[Any, dict[str, Any], Any]:
    """Train, then fit the temperature and the checks on val as core.final_train does; the test split predicted."""
    from core.model import ood
    from core.model.calibration import apply_temperature, fit_temperature
    from core.model.checked_prediction import fit_checks
    from core.model.loading import load_for_inference
    from core.evaluation.trust import Evaluated
    from core.train import RunOptions, train

    train(cfg, data, out, options=RunOptions(progress=False, tensorboard=False))
    loaded = load_for_inference(out / "best.pt", "cpu")
    val, test = data.indices("val"), data.indices("test")
    with ood.capture(loaded.model) as seen:
        raw = loaded.predict(np.asarray(data.images[val]), calibrated=False)
    temperature = fit_temperature(data.labels[val], raw)
    fitted = fit_checks(data.labels[val], {"single": raw}, {"single": temperature}, seen, data.class_names)
    loaded.header["calibration"] = {"fitted_on": "val", "temperature": {"single": temperature}}
    loaded.header.update(fitted)
    pixels = np.asarray(data.images[test])
    with ood.capture(loaded.model) as seen:
        raw = loaded.predict(pixels, calibrated=False)
    return loaded, fitted, Evaluated(pixels=pixels, labels=data.labels[test], probs=apply_temperature(raw, temperature),
                                     features=seen.features, logits=seen.logits)


def _without_class(data: Any, left: int) -> Any:
    """``data`` without class ``left`` (its images gone from every split; the other classes renumbered)."""
    keep = data.labels != left
    labels = data.labels[keep]
    return dataclasses.replace(
        data, images=np.ascontiguousarray(data.images[keep]), labels=labels - (labels > left),
        class_names=tuple(c for i, c in enumerate(data.class_names) if i != left), image_ids=data.image_ids[keep],
        groups=data.groups[keep], split=data.split[keep], fingerprint=f"{data.fingerprint}-without-{left}",
        masks=None, has_mask=None, metadata=None if data.metadata is None else data.metadata[keep].reset_index(drop=True))


def request_cost(model_path: Path, fitted: dict[str, Any], args: Any) -> dict[str, Any]:
    """Median ms of a 1-image prediction without and with the captured features and the checks."""
    from core.model.checked_prediction import predict_checked
    from core.model.loading import load_for_inference

    loaded = load_for_inference(model_path, "cpu")
    loaded.header.update(fitted)
    image = np.random.default_rng(0).integers(0, 256, (1, 3, args.image_size, args.image_size), dtype=np.uint8)
    timings: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.repeats):  # interleaved, so that drift of the shared machine hits both alike
        for key in timings:
            started = time.perf_counter()
            if key == "with":
                predict_checked(loaded, image)
            else:
                loaded.predict(image)
            timings[key].append(1000 * (time.perf_counter() - started))
    return {"repeats": args.repeats, "without_ms": statistics.median(timings["without"]),
            "with_ms": statistics.median(timings["with"])}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": {}}
    for row in ROWS:
        out["rows"][row] = {"n": runs[0]["counts"][row], **{
            score: {metric: mean_sd([r["scores"][row][score][metric] for r in runs])
                    for metric in ("auroc", "fpr_at_95")} for score in SCORES}}
        out["rows"][row]["best"] = min(SCORES, key=lambda s: out["rows"][row][s]["fpr_at_95"]["mean"])
    gains = [r["balanced_accuracy"]["surest_90"] - r["balanced_accuracy"]["all"] for r in runs]
    out["abstention"] = {"all": mean_sd([r["balanced_accuracy"]["all"] for r in runs]),
                         "surest_90": mean_sd([r["balanced_accuracy"]["surest_90"] for r in runs]),
                         "gain_at_90": {**mean_sd(gains), "per_seed": gains},
                         "aurc": mean_sd([r["aurc"] for r in runs]),
                         "rule_coverage": mean_sd([r["rule"]["coverage"] for r in runs])}
    return out


def table(summary: dict[str, Any]) -> str:
    def cell(d: dict[str, float], pct: bool = False) -> str:
        f, digits = (100, 1) if pct else (1, 3)
        spread = "" if d["sd"] is None else f" ± {f * d['sd']:.{digits}f}"
        return f"{f * d['mean']:.{digits}f}{'%' if pct else ''}{spread}"

    lines = ["| set | images | " + " | ".join(f"{s}: AUROC / FPR@95" for s in SCORES) + " | best (FPR@95) |",
             "|---|---|" + "---|" * (len(SCORES) + 1)]
    for row, entry in summary["rows"].items():
        lines.append(f"| {row} | {entry['n']} | " + " | ".join(
            f"{cell(entry[s]['auroc'])} / {cell(entry[s]['fpr_at_95'], True)}" for s in SCORES)
            + f" | {entry['best']} |")
    a = summary["abstention"]
    lines.append(f"\nabstention: test balanced accuracy, all answered {cell(a['all'])}, the surest 90% "
                 f"{cell(a['surest_90'])}: {a['gain_at_90']['mean']:+.3f}{_sd(a['gain_at_90'])} "
                 f"(per seed {', '.join(f'{g:+.3f}' for g in a['gain_at_90']['per_seed'])}); AURC {cell(a['aurc'])}; "
                 f"the rule chosen on val for 90% answers {cell(a['rule_coverage'], True)} of test")
    return "\n".join(lines)


def _sd(d: dict[str, Any]) -> str:
    return "" if d["sd"] is None else f" ± {d['sd']:.3f}"


def _seed_line(run: dict[str, Any]) -> str:
    far, near = run["scores"]["far_out"], run["scores"]["near_out"]
    return (f"seed {run['seed']}: far-out FPR@95 " + ", ".join(f"{s} {100 * far[s]['fpr_at_95']:.1f}%" for s in SCORES)
            + "; near-out AUROC " + ", ".join(f"{s} {near[s]['auroc']:.3f}" for s in SCORES)
            + f"; balanced accuracy all {run['balanced_accuracy']['all']:.3f}, surest 90% "
              f"{run['balanced_accuracy']['surest_90']:.3f}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = study_parser("bench.ood_study", __doc__, epochs=3)
    parser.add_argument("--leave-out", default="df", help="the near-out class, left out of training (default df)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200, help="1-image predictions timed for the cost")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    return args


if __name__ == "__main__":
    run_cli(main)
