"""Does the sweep's ensemble beat its single winner on lesions it never saw? Sweeps, final trainings, a table.

    python -m bench.ensemble_study --out ensemble_study.json --results results/ens-study
        # defaults: --seeds 0 1 2 --trials 8 --epochs 6 --image-size 32, confirm 2 configs x 2 seeds, ensemble 5

For each sweep seed: ``python -m sweep.run`` (search_spaces/efficacy.yaml, TPE + ASHA, the confirmation stage,
greedy ensemble selection on validation), then ``python -m core.final_train`` of its best.json, which retrains
the winner and builds the ensemble. On the test split (never seen by the sweep), calibrated single-view
probabilities of:

  single     the winner retrained (final/model.pt)
  ensemble   the greedy ensemble (final/ensemble.pt; members weighted by their picks)
  average    the plain average of every full-length run of the sweep (search trials not stopped, confirmation runs)
  seeds      the winning config's own runs alone (its search trial and confirmation runs: an ensemble of seeds)
  greedy-nll the same greedy selection as the sweep's, on the validation loss (NLL) instead of the sweep's metric
             (a smooth criterion: balanced accuracy of an argmax moves in steps, and often no addition moves it)

each calibrated with its own temperature fitted on the validation split: balanced accuracy (plain argmax, and
the "balanced" rule: probabilities divided by the training prior to the power 0.5 before the argmax), macro AUC
and ECE, each with its 95% interval over lesions, and each minus the single winner's, paired over lesions
(core/evaluation/ensemble_compare.py). Prints the table; ``--out`` writes every figure as JSON. Runs on
``../shared/data/ham10000-200x150`` when it is there, else on generated data, and says which.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.common import bench_data, bench_parser, result_header, write_result, work_folder
from bench.sweep_runs import METRIC, stop_ray, sweep_run
from core.errors import run_cli

log = logging.getLogger(__name__)

KINDS = ("single", "ensemble", "average", "seeds", "greedy-nll")
PRIOR_POWER = 0.5   # the balanced decision rule: p / prior**0.5, then argmax


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    source = bench_data(args.data, demo_lesions=args.demo_lesions, demo_image_size=64)
    print(f"data: {source.source} ({source.path}); {len(args.seeds)} sweep(s) of {args.trials} trials x "
          f"{args.epochs} epochs at {args.image_size} px, confirmation {args.confirm_top} x {args.confirm_seeds}, "
          f"ensemble of up to {args.ensemble_size} picks", flush=True)
    started = time.time()
    with work_folder(args.results, "bench-ens-") as results_root:
        try:
            sweeps = [_one_sweep(args, source.path, seed, results_root) for seed in args.seeds]
        finally:
            stop_ray()  # before the folder goes: Ray's workers may still write into it
    result = {**result_header(__spec__.name, argv, started, source),
              "settings": {k: getattr(args, k) for k in ("seeds", "trials", "epochs", "image_size", "confirm_top",
                                                         "confirm_seeds", "ensemble_size", "cpus_per_trial")},
              "sweeps": sweeps}
    print(table(sweeps))
    write_result(result, args.out)
    return 0


def _parse_args(argv: Sequence[str] | None) -> Any:
    parser = bench_parser(__spec__.name, __doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sweep seeds (default 0 1 2)")
    parser.add_argument("--trials", type=int, default=8, help="search trials per sweep (default 8)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of a full-length run (default 6)")
    parser.add_argument("--image-size", type=int, default=32, help="image size (default 32)")
    parser.add_argument("--confirm-top", type=int, default=2, help="configs confirmed (default 2)")
    parser.add_argument("--confirm-seeds", type=int, default=2, help="new seeds per confirmed config (default 2)")
    parser.add_argument("--ensemble-size", type=int, default=5, help="most picks of the ensemble (default 5)")
    parser.add_argument("--cpus-per-trial", type=int, default=1, help="torch threads per trial (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the final training (default 2)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--results", help="keep the sweeps here (default: a temporary folder, removed)")
    parser.add_argument("--reuse", action="store_true", help="with --results: a sweep whose final training is "
                                                             "there is evaluated again, not run again")
    return parser.parse_args(argv)


def _one_sweep(args: Any, data_path: Path, seed: int, results_root: Path) -> dict[str, Any]:
    from sweep.settings import SweepSettings

    settings = SweepSettings(
        name=f"ens-seed{seed}", results=str(results_root), space="search_spaces/efficacy.yaml", data=str(data_path),
        trials=args.trials, max_epochs=args.epochs, gpus=0, cpus_per_trial=args.cpus_per_trial, seed=seed,
        confirm_top=args.confirm_top, confirm_seeds=args.confirm_seeds, ensemble_size=args.ensemble_size,
        overrides=(f"image_size={args.image_size}", "device=cpu", f"seed={seed}"))
    folder = results_root / settings.name
    if args.reuse and (folder / "final" / "metrics.json").is_file():  # swept and trained before: evaluate again
        return {"seed": seed, "sweep_min": None, **evaluate_sweep(folder, args, train=False)}
    began = time.time()
    run = sweep_run(settings)
    swept = time.time() - began
    print(f"seed {seed}: sweep done in {swept / 60:.1f} min; final training", flush=True)
    return {"seed": seed, "sweep_min": round(swept / 60, 1), **evaluate_sweep(Path(run["sweep_dir"]), args)}


def evaluate_sweep(folder: Path, args: Any, train: bool = True) -> dict[str, Any]:
    """final_train of the sweep, then the four kinds of model on the test split (see the module docstring)."""
    import pandas as pd

    from core import filenames
    from core.best_file import read_best
    from core.evaluation.sections import SectionOptions
    from core.data.dataset import load_for_config
    from core.evaluation.ensemble_compare import compare
    from core.ensemble_file import read_ensemble_choice
    from core.final_ensemble import EnsembleFit, calibrated_ensemble
    from core.final_train import FinalOptions, final_train
    from core.model.loading import load_for_inference
    from sweep.ensemble import full_length_runs, greedy_select, read_val_probs

    began = time.time()
    options = SectionOptions(resamples=args.resamples)
    if train:
        final_train(folder / filenames.BEST_TRIAL, FinalOptions(gallery_per_class=0, progress=False,
                                                                evaluation=options))
    best = read_best(folder / filenames.BEST_TRIAL)
    data = load_for_config(best.data_path, best.config, splits_file=best.splits_file, progress=False)
    test = data.indices("test")
    labels, groups = data.labels[test], data.groups[test]
    prior = np.bincount(data.labels[data.indices("train")], minlength=len(data.class_names)) / len(data.indices("train"))
    probs: dict[str, np.ndarray] = {}
    members: dict[str, list[str]] = {}

    single = load_for_inference(folder / filenames.FINAL_DIR / filenames.MODEL, "cpu")
    probs["single"] = single.predict(np.asarray(data.images[test]))
    members["single"] = [f"final ({best.trial_id}'s config)"]
    choice = read_ensemble_choice(folder / filenames.ENSEMBLE_CHOICE) if (folder / filenames.ENSEMBLE_CHOICE).is_file() else None
    if choice is not None and choice.is_ensemble:
        chosen = load_for_inference(folder / filenames.FINAL_DIR / filenames.ENSEMBLE_MODEL, "cpu")
        probs["ensemble"] = chosen.predict(np.asarray(data.images[test]))
        members["ensemble"] = [f"{m.trial_id} x{m.count}" for m in choice.members]
    else:
        probs["ensemble"], members["ensemble"] = probs["single"], ["(none: no run improved the best alone on val)"]
    frame = pd.read_csv(folder / filenames.TRIALS_CSV)
    full = [r["trial_id"] for r in full_length_runs(frame, best.config.epochs)]
    seeds = _config_runs(folder)
    for kind, ids in (("average", full), ("seeds", seeds)):
        files = [(t, folder / filenames.TRIALS_DIR / t / filenames.BEST_CHECKPOINT, 1.0) for t in ids]
        if len(files) < 2:
            probs[kind], members[kind] = probs["single"], [f"(only {len(files)} run)"]
            continue
        _, _, scored = calibrated_ensemble(files, {}, folder / filenames.TRIALS_CSV, best, best.config, data,
                                          EnsembleFit(options))
        probs[kind], members[kind] = scored.results.probs, ids
    kept = [read_val_probs(folder / filenames.TRIALS_DIR / t) for t in full]
    by_nll = greedy_select([k["probs"] for k in kept], kept[0]["labels"], "val_loss", args.ensemble_size)
    picked = [(full[i], folder / filenames.TRIALS_DIR / full[i] / filenames.BEST_CHECKPOINT, float(by_nll.counts[i]))
              for i in np.flatnonzero(by_nll.counts)]
    if len(picked) > 1:
        _, _, scored = calibrated_ensemble(picked, {}, folder / filenames.TRIALS_CSV, best, best.config, data,
                                          EnsembleFit(options))
        probs["greedy-nll"] = scored.results.probs
    else:
        probs["greedy-nll"] = probs["single"]
    members["greedy-nll"] = [f"{t} x{int(c)}" for t, _, c in picked]
    rows = {}
    for kind in KINDS:
        compared = compare(labels, groups, probs["single"], probs[kind], names=("single", kind),
                           resamples=args.resamples)
        balanced = probs[kind] / prior[None, :] ** PRIOR_POWER
        rule = compare(labels, groups, probs["single"] / prior[None, :] ** PRIOR_POWER, balanced,
                       names=("single", kind), resamples=args.resamples)["metrics"]["balanced_accuracy"]
        rows[kind] = {"members": members[kind], **{m: compared["metrics"][m][kind] for m in ("balanced_accuracy", "auc", "ece")},
                      "minus_single": {m: compared["metrics"][m]["difference"] for m in ("balanced_accuracy", "auc", "ece")},
                      "balanced_rule": {"balanced_accuracy": rule[kind], "minus_single": rule["difference"]}}
    return {"sweep_dir": str(folder), "winner": best.trial_id, "full_length_runs": len(full),
            "val": ({"best_single": choice.best_single_value, "ensemble": choice.ensemble_value,
                     "stopped": choice.document["stopped"]} if choice else None),
            "test_images": int(len(test)), "final_min": round((time.time() - began) / 60, 1), "rows": rows}


def _config_runs(folder: Path) -> list[str]:
    """The winning config's runs: its search trial and its confirmation runs (best.json's confirmation)."""
    import json

    from core import filenames

    best = json.loads((folder / filenames.BEST_TRIAL).read_text(encoding="utf-8"))
    runs = (best.get("confirmation") or {}).get("runs") or [{"trial_id": best["trial_id"]}]
    return [r["trial_id"] for r in runs]


def _cell(entry: dict[str, Any], signed: bool = False) -> str:
    value = f"{entry['value']:+.3f}" if signed else f"{entry['value']:.3f}"
    interval = entry.get("interval")
    return value if not interval else f"{value} [{interval[0]:+.3f}, {interval[1]:+.3f}]" if signed else \
        f"{value} [{interval[0]:.3f}, {interval[1]:.3f}]"


def table(sweeps: Sequence[dict[str, Any]]) -> str:
    """Per sweep and kind: the figures with intervals and the paired differences; then the means over sweeps."""
    lines = ["| seed | model | members | bal acc | - single | bal acc (balanced rule) | - single | macro AUC | - single "
             "| ECE | - single |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for sweep in sweeps:
        for kind, row in sweep["rows"].items():
            diff, rule = row["minus_single"], row["balanced_rule"]
            lines.append(f"| {sweep['seed']} | {kind} | {len(row['members'])} | {_cell(row['balanced_accuracy'])} | "
                         f"{_cell(diff['balanced_accuracy'], True) if kind != 'single' else ''} | "
                         f"{_cell(rule['balanced_accuracy'])} | "
                         f"{_cell(rule['minus_single'], True) if kind != 'single' else ''} | {_cell(row['auc'])} | "
                         f"{_cell(diff['auc'], True) if kind != 'single' else ''} | {_cell(row['ece'])} | "
                         f"{_cell(diff['ece'], True) if kind != 'single' else ''} |")
    lines += ["", "mean over sweeps (differences: paired by sweep); members of each:"]
    for kind in KINDS:
        def mean(path: Sequence[str]) -> float:
            values = []
            for sweep in sweeps:
                entry: Any = sweep["rows"][kind]
                for key in path:
                    entry = entry[key]
                values.append(entry["value"])
            return statistics.fmean(values)

        lines.append(f"  {kind:10s} bal acc {mean(['balanced_accuracy']):.3f} ({mean(['minus_single', 'balanced_accuracy']):+.3f}), "
                     f"balanced rule {mean(['balanced_rule', 'balanced_accuracy']):.3f} "
                     f"({mean(['balanced_rule', 'minus_single']):+.3f}), macro AUC {mean(['auc']):.3f} "
                     f"({mean(['minus_single', 'auc']):+.3f}), ECE {mean(['ece']):.3f} ({mean(['minus_single', 'ece']):+.3f})")
    return "\n".join([*lines, *(line for sweep in sweeps for line in _seed_lines(sweep))])


def _seed_lines(sweep: dict[str, Any]) -> list[str]:
    """One sweep's members per kind and, where it chose an ensemble, its validation figures and times."""
    head = f"  seed {sweep['seed']}: "
    members = head + "; ".join(f"{k}: {', '.join(r['members'])}" for k, r in sweep["rows"].items())
    val = sweep["val"]
    return [members] + ([f"{head}val {METRIC} best run {val['best_single']:.3f} -> ensemble {val['ensemble']:.3f} "
                         f"({val['stopped']}); {sweep['full_length_runs']} full-length runs; sweep "
                         f"{sweep['sweep_min']} min, final {sweep['final_min']} min"] if val else [])


if __name__ == "__main__":
    run_cli(main)
