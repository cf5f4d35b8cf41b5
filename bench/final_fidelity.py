"""Does the final model keep its trial's promise? Short trials + long retrain against trials at the retrain length.

    python -m bench.final_fidelity --out fidelity.json     # HAM10000 copy, search_spaces/efficacy.yaml, 3 seeds

For each sweep seed (``--seeds``), each method spends ``--budget`` trial-epochs on a TPE + ASHA sweep
(``python -m sweep.run --budget`` as it runs, no confirmation; ASHA's rungs derived from the space by
sweep/schedule.py; no new trial starts once the sweep's trials have run the budget, so the running ones
can add up to a trial length each; at most twice the trials ASHA's estimate expects), then retrains the
winner with ``core.final_train`` as a user would:

  (a) short      trials of ``--short-epochs`` (S), retrained for ``--long-epochs`` (L) epochs
                 (``--epochs L``: today's habit; final_train warns that the config was tuned for S)
  (b) long       trials of L epochs, retrained with final_train's default epochs (best.json's, = L)
  (c) long-ema   (b) with ``ema_decay`` fixed in every trial and the retrain: the decay whose averaging
                 horizon 1 / (1 - decay) is ``--ema-horizon-epochs`` epochs of optimiser steps on this
                 data (so it follows the data size, and is never chosen from any score)

For each run: the winning trial's best epoch (its best.pt) val and TEST balanced accuracy, the final
model's (its model.pt, the epoch final_train chose by val) val and TEST balanced accuracy, both scored on
the test split through core.model.inference in the same way, the gap final - trial on test, and the final
run's val swing: the mean |change| of val balanced accuracy between consecutive epochs (metrics.csv).
Prints the table (mean +- sd over the seeds, paired differences, per-seed rows) and the targets
(final test >= the winning trial's test, per method; (b) and (c) above (a)) as met or MISSED; with
``--out`` writes JSON with every figure. ``--set KEY=VALUE`` fixes a config key everywhere (e.g.
image_size=64); ``--gpus`` runs the trials on GPUs. ``--results DIR`` keeps the sweeps and final runs
(default: a temporary folder, removed); ``--resume`` continues an interrupted benchmark there: a sweep or
final training that finished is read and scored again, an interrupted one continued, a missing one run.
Runs on ``../shared/data/ham10000-200x150`` when it is there, else on
generated data, and says which.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import bench_data, bench_parser, command_line, machine_info, write_result, work_folder
from bench.sweep_runs import METRIC, cell, mean_sd, score_model, stop_ray, sweep_run, trial_cap
from core.errors import run_cli

log = logging.getLogger(__name__)

METHODS = ("short", "long", "long-ema")
# Wall seconds per trial-epoch of a 32 px sweep on the 2-core machine (bench/hpo_efficacy.py's run: 380 s for
# 56 trial-epochs), and per epoch of a final training (one process, 2 threads); for the printed estimate only.
SWEEP_S_PER_TRIAL_EPOCH = 6.8
FINAL_S_PER_EPOCH = 5.0
# A sweep stops starting trials at its budget but lets the running ones finish: it spends somewhat more.
TPE_OVERSPEND = 1.15


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    from core.config import TrainConfig
    from core.data.dataset import load_for_config
    from sweep.space import load_space

    torch.set_num_threads(args.threads)
    source = bench_data(args.data, demo_lesions=args.demo_lesions, demo_image_size=64)
    space = load_space(args.space)
    base = TrainConfig.from_dict({"select_metric": METRIC},
                                 base=TrainConfig.from_dict(space.base).with_overrides(tuple(args.overrides)))
    data = load_for_config(str(source.path), base, progress=False)
    steps = max(1, len(data.indices("train")) // base.batch_size)  # optimiser steps per epoch (partial batch dropped)
    ema_decay = round(1.0 - 1.0 / max(1.0, args.ema_horizon_epochs * steps), 5)
    plans = budget_plans(args, space)
    estimate = _estimate_s(args, plans)
    print(f"data: {source.source} ({source.path}); space {args.space}; budget {args.budget} trial-epochs per "
          f"method; S={args.short_epochs}, L={args.long_epochs}; EMA decay {ema_decay} ({steps} steps per epoch, "
          f"horizon {args.ema_horizon_epochs:g} epoch(s)); plans: {plans}", flush=True)
    print(f"estimated time: {estimate / 60:.0f} min ({SWEEP_S_PER_TRIAL_EPOCH} s per trial-epoch x "
          f"{TPE_OVERSPEND} for TPE, {FINAL_S_PER_EPOCH} s per final epoch)", flush=True)
    started = time.time()
    with work_folder(args.results, "bench-fidelity-") as results_root:
        try:
            runs = _run_all(args, source.path, data, plans, ema_decay, results_root)
        finally:
            stop_ray()  # before the folder goes: Ray's workers may still write into it
    summary = summarise(runs)
    result = {"benchmark": "final_fidelity", "command": command_line(__spec__.name, argv),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - started, 1),
              "estimated_s": round(estimate), "machine": machine_info(torch.device("cuda" if args.gpus else "cpu")),
              "data": {"source": source.source, "path": str(source.path)},
              "settings": {"space": args.space, "budget": args.budget, "short_epochs": args.short_epochs,
                           "long_epochs": args.long_epochs, "seeds": args.seeds, "ema_decay": ema_decay,
                           "ema_horizon_epochs": args.ema_horizon_epochs, "steps_per_epoch": steps,
                           "cpus_per_trial": args.cpus_per_trial, "gpus": args.gpus,
                           "gpus_per_trial": args.gpus_per_trial, "overrides": args.overrides, "plans": plans},
              "summary": summary, "targets": targets(summary, runs), "runs": runs}
    print(table(summary, runs, result["targets"]))
    write_result(result, args.out)
    return 0


def _parse_args(argv: Sequence[str] | None) -> Any:
    parser = bench_parser(__spec__.name, __doc__)
    parser.add_argument("--space", default="search_spaces/efficacy.yaml",
                        help="search space (default search_spaces/efficacy.yaml)")
    parser.add_argument("--short-epochs", type=int, default=4, help="(a): epochs of a trial (default 4)")
    parser.add_argument("--long-epochs", type=int, default=20,
                        help="(a)'s retrain and (b), (c)'s trials and retrain (default 20)")
    parser.add_argument("--budget", type=int, default=60,
                        help="trial-epochs per method and seed: each sweep's --budget (default 60)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sweep seeds (default 0 1 2)")
    parser.add_argument("--ema-horizon-epochs", type=float, default=1.0,
                        help="(c): EMA averaging horizon 1 / (1 - decay), in epochs of steps (default 1)")
    parser.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs per trial (default 1)")
    parser.add_argument("--gpus", type=int, default=0,
                        help="GPUs for the sweeps' trials (default 0: the CPU; the final trainings use a GPU "
                             "when one is visible)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial with --gpus (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a config key in every trial and retrain, e.g. image_size=64; repeatable")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the final trainings and scoring")
    parser.add_argument("--gallery", type=int, default=0, help="Grad-CAM examples per class of the final runs "
                                                              "(default 0: none; not what is measured)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--results", help="keep the sweeps in this folder (default: a temporary one, removed)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweeps and final trainings already in --results (needs --results)")
    args = parser.parse_args(argv)
    if args.resume and not args.results:
        parser.error("--resume needs --results (the folder of the interrupted benchmark)")
    if not 1 <= args.short_epochs <= args.long_epochs or args.budget < args.long_epochs:
        parser.error("need 1 <= --short-epochs <= --long-epochs <= --budget")
    if args.ema_horizon_epochs <= 0:
        parser.error("--ema-horizon-epochs must be positive")
    return args


def budget_plans(args: Any, space: Any) -> dict[str, dict[str, int]]:
    """Trial length, most trials (bench.sweep_runs.trial_cap) and ASHA's rungs of each method's sweep; each
    stops at ``--budget`` trial-epochs."""
    from sweep.schedule import Asha

    plans = {}
    for method in args.methods:
        epochs = args.short_epochs if method == "short" else args.long_epochs
        asha = Asha.for_trials(epochs, space.asha.get("grace_period"), space.asha.get("reduction_factor"))
        plans[method] = {"trial_epochs": epochs, "trials": trial_cap(asha, args.budget), "rungs": asha.rungs}
    return plans


def _estimate_s(args: Any, plans: dict[str, dict[str, Any]]) -> float:
    per_seed = len(plans) * (args.budget * TPE_OVERSPEND * SWEEP_S_PER_TRIAL_EPOCH
                             + args.long_epochs * FINAL_S_PER_EPOCH + 20)
    return per_seed * len(args.seeds)


def _run_all(args: Any, data_path: Path, data: Any, plans: dict[str, dict[str, Any]], ema_decay: float,
             results_root: Path) -> list[dict[str, Any]]:
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            started = time.time()
            log.info("seed %d: %s", seed, method)
            plan = {**plans[method], "ema_decay": ema_decay if method == "long-ema" else 0.0}
            run = _method_run(args, data_path, data, method, plan, seed, results_root)
            run.update(method=method, seed=seed, wall_s=round(time.time() - started, 1))
            runs.append(run)
            print(f"seed {seed} {method}: trial val {run['trial']['val']:.4f} test "
                  f"{run['trial']['test_balanced_accuracy']:.4f} -> final ({run['final_epochs']} epochs) val "
                  f"{run['final']['val']:.4f} test {run['final']['test_balanced_accuracy']:.4f}, swing "
                  f"{run['final_val_swing']:.4f} ({run['trial_epochs']} trial-epochs, {run['wall_s']:.0f} s)",
                  flush=True)
    return runs


def _method_run(args: Any, data_path: Path, data: Any, method: str, plan: dict[str, Any], seed: int,
                results_root: Path) -> dict[str, Any]:
    """One sweep and the final training of its winner, both scored on the test split; ``plan``: the method's trial
    count and length, and its ``ema_decay`` (0: none)."""
    import pandas as pd

    from core import filenames
    from core.final_train import FinalOptions, final_train
    from sweep.settings import SETTINGS_FILE, SweepSettings

    overrides = (*args.overrides, f"seed={seed}") + ((f"ema_decay={plan['ema_decay']}",) if plan["ema_decay"] else ())
    name = f"{method}-seed{seed}"
    chosen = sweep_run(SweepSettings(
        name=name, results=str(results_root), space=args.space, data=str(data_path), metric=METRIC,
        max_epochs=plan["trial_epochs"], scheduler="asha", sampler="tpe", trials=plan["trials"],
        budget=args.budget, seed=seed,
        overrides=overrides, gpus=args.gpus, gpus_per_trial=args.gpus_per_trial if args.gpus else None,
        cpus_per_trial=args.cpus_per_trial, confirm_top=0),
        resume=args.resume and (results_root / name / SETTINGS_FILE).is_file())
    (folder,) = chosen.pop("folders")
    trial = score_model(Path(folder) / filenames.BEST_CHECKPOINT, data)
    with _captured_warnings("core.final_train") as warnings:
        final = final_train(chosen["best_json"], FinalOptions(
            epochs=args.long_epochs if method == "short" else None, progress=False, resume=args.resume,
            gallery_per_class=args.gallery))
    history = pd.read_csv(final.out_dir / filenames.METRICS_CSV)
    scored = score_model(final.out_dir / filenames.MODEL, data)
    return {**chosen, "trial_folder": folder, "trial": trial, "final_dir": str(final.out_dir),
            "final_epochs": int(len(history)), "final": scored,
            "final_metrics_json_test_balanced_accuracy": final.metrics["test_balanced_accuracy"],
            "gap": scored["test_balanced_accuracy"] - trial["test_balanced_accuracy"],
            "final_val_swing": val_swing(history[METRIC].tolist()), "mismatch_warning": warnings[0] if warnings else None}


def val_swing(values: Sequence[float]) -> float:
    """Mean |change| between consecutive epochs (nan with fewer than two)."""
    deltas = [abs(b - a) for a, b in zip(values, values[1:])]
    return sum(deltas) / len(deltas) if deltas else math.nan


class _captured_warnings:
    """The WARNING messages a logger emits inside the ``with`` block (they still reach the console)."""

    def __init__(self, name: str) -> None:
        self.logger, self.messages = logging.getLogger(name), []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)


FIGURES = {"trial_val": ("trial", "val"), "trial_test": ("trial", "test_balanced_accuracy"),
           "final_val": ("final", "val"), "final_test": ("final", "test_balanced_accuracy")}


def _figure(run: dict[str, Any], key: str) -> float:
    if key in FIGURES:
        part, name = FIGURES[key]
        return run[part][name]
    return run[key]


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and sd over the seeds of each method's figures, and its final test gain over the others, by seed."""
    out: dict[str, dict[str, Any]] = {}
    keys = ("trials", "trial_epochs", *FIGURES, "gap", "final_val_swing", "wall_s")
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        if rows:
            out[method] = {key: mean_sd([_figure(r, key) for r in rows]) for key in keys}
    for method in out:
        out[method]["final_test_gain_over"] = {
            other: mean_sd(_paired(runs, method, other, "final_test")) for other in out if other != method}
    return out


def _paired(runs: Sequence[dict[str, Any]], method: str, other: str, key: str) -> list[float]:
    by_seed = {r["seed"]: _figure(r, key) for r in runs if r["method"] == other}
    return [_figure(r, key) - by_seed[r["seed"]] for r in runs if r["method"] == method and r["seed"] in by_seed]


def targets(summary: dict[str, dict[str, Any]], runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets on the means over the seeds: final test >= trial test; (b), (c) above (a)."""
    out = []
    for method, s in summary.items():
        out.append({"target": f"{method}: final test >= winning trial's test", "value": s["gap"]["mean"],
                    "met": s["gap"]["mean"] >= 0})
    for method in ("long", "long-ema"):
        if method in summary and "short" in summary:
            gain = summary[method]["final_test_gain_over"]["short"]["mean"]
            out.append({"target": f"{method} final test > short final test", "value": gain, "met": gain > 0})
    return out


def table(summary: dict[str, dict[str, Any]], runs: Sequence[dict[str, Any]], goals: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | trials | trial-epochs | trial val | trial TEST | final val | final TEST | final - trial TEST "
             "| final val swing |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in summary.items():
        lines.append(f"| {method} | {cell(s['trials'], 1)} | {cell(s['trial_epochs'], 0)} | {cell(s['trial_val'])} | "
                     f"{cell(s['trial_test'])} | {cell(s['final_val'])} | {cell(s['final_test'])} | {cell(s['gap'])} | "
                     f"{cell(s['final_val_swing'])} |")
    lines += ["", "final TEST balanced accuracy, method minus method (paired by seed, mean +- sd):"]
    for first, second in (("long", "short"), ("long-ema", "short"), ("long-ema", "long")):
        if first in summary and second in summary:
            lines.append(f"  {first} - {second}: {cell(summary[first]['final_test_gain_over'][second])}")
    if "long" in summary and "long-ema" in summary:
        swing = mean_sd(_paired(runs, "long-ema", "long", "final_val_swing"))
        lines.append(f"final val swing, long-ema - long: {cell(swing)}")
    lines += ["", "targets (means over the seeds):"]
    lines += [f"  {'met' if g['met'] else 'MISSED'}: {g['target']} ({g['value']:+.4f})" for g in goals]
    lines += ["", "per seed: method  trial val  trial test  final val  final test  gap  swing  trial-epochs  final "
                  "epoch/epochs"]
    for r in runs:
        lines.append(f"  seed {r['seed']} {r['method']:<9} {r['trial']['val']:.4f} {r['trial']['test_balanced_accuracy']:.4f}"
                     f" {r['final']['val']:.4f} {r['final']['test_balanced_accuracy']:.4f} {r['gap']:+.4f} "
                     f"{r['final_val_swing']:.4f} {r['trial_epochs']} {r['final']['epoch']}/{r['final_epochs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
