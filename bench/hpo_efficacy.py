"""Does the sweep choose configs that hold up on lesions it never saw? Four ways to choose, one budget.

    python -m bench.hpo_efficacy --out efficacy.json      # HAM10000 copy, search_spaces/efficacy.yaml, 3 seeds

For each sweep seed (``--seeds``), each method may spend ``--budget`` trial-epochs (trials of ``--epochs``):

  (a) default           the config's defaults (the space's base, nothing searched), trained once
  (b) random            Optuna's RandomSampler, no early stopping: budget / epochs trials
  (c) tpe-asha          TPE + ASHA as ``python -m sweep.run --budget`` runs them, no confirmation: no new
                        trial starts once the sweep's trials have run the budget (the running ones finish)
  (d) tpe-asha-confirm  (c) plus the confirmation stage (``--confirm-top``, ``--confirm-seeds``); its
                        search gets the budget minus the confirmation runs

For the config each method chooses: its val score (balanced accuracy of its best.pt, the best epoch by
val), its score on the TEST split (which no method sees: best.pt evaluated once, here), and the drop
val - test. (d) hands on a config backed by several runs; its figures are the means over those runs'
best.pt. Every trial of a seed trains with ``seed`` = that sweep seed (confirmation runs: + 1 .. + S).

Prints the table (mean +- sd over the seeds, and the per-seed figures), and with ``--out`` writes JSON
with every figure, the trial-epochs each method really used and each sweep's optuna.db state counts.
``--results DIR`` keeps the sweeps (default: a temporary folder, removed). Runs on
``../shared/data/ham10000-200x150`` when it is there, else on generated data, and says which.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import bench_data, bench_parser, result_header, write_result, work_folder
from bench.sweep_runs import METRIC, cell, checkpoint_scores, mean_sd, stop_ray, sweep_run, trial_cap
from core.errors import run_cli

log = logging.getLogger(__name__)

METHODS = ("default", "random", "tpe-asha", "tpe-asha-confirm")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    from core.config import TrainConfig
    from sweep.space import load_space

    torch.set_num_threads(args.threads)
    source = bench_data(args.data, demo_lesions=args.demo_lesions, demo_image_size=64)
    space = load_space(args.space)
    base = TrainConfig.from_dict({"epochs": args.epochs, "select_metric": METRIC, "device": "cpu"},
                                 base=TrainConfig.from_dict(space.base))
    plans = budget_plans(args, space)
    print(f"data: {source.source} ({source.path}); space {args.space}; {args.epochs}-epoch trials; budget "
          f"{args.budget} trial-epochs per method; plans: {plans}", flush=True)
    started = time.time()
    with work_folder(args.results, "bench-hpo-") as results_root:
        try:
            runs = _run_all(args, source.path, base, plans, results_root)
        finally:
            stop_ray()  # before the folder goes: Ray's workers may still write into it
    result = {**result_header(__spec__.name, argv, started, source),
              "settings": {"space": args.space, "epochs": args.epochs, "budget": args.budget, "seeds": args.seeds,
                           "confirm_top": args.confirm_top, "confirm_seeds": args.confirm_seeds,
                           "cpus_per_trial": args.cpus_per_trial, "plans": plans},
              "summary": summarise(runs), "runs": runs}
    print(table(result["summary"], runs))
    write_result(result, args.out)
    return 0


def _parse_args(argv: Sequence[str] | None) -> Any:
    parser = bench_parser(__spec__.name, __doc__)
    parser.add_argument("--space", default="search_spaces/efficacy.yaml", help="search space (default "
                                                                                "search_spaces/efficacy.yaml)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of a full trial (default 8)")
    parser.add_argument("--budget", type=int, default=64, help="trial-epochs per method and seed (default 64)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sweep seeds (default 0 1 2)")
    parser.add_argument("--confirm-top", type=int, default=2, help="(d): configs confirmed (default 2)")
    parser.add_argument("--confirm-seeds", type=int, default=1, help="(d): new seeds per config (default 1)")
    parser.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs per trial (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of (a) and of the test pass")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--results", help="keep the sweeps in this folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.budget < args.epochs:
        parser.error("--epochs must be at least 1 and --budget at least --epochs")
    confirm = confirm_epochs(args)
    if "tpe-asha-confirm" in args.methods and args.budget - confirm < args.epochs:
        parser.error(f"--budget {args.budget} leaves (d) no search trial beside its {confirm} confirmation "
                     f"trial-epochs (--confirm-top x --confirm-seeds x --epochs); raise --budget")
    return args


def confirm_epochs(args: Any) -> int:
    """Trial-epochs of (d)'s confirmation runs, taken from its budget."""
    return args.confirm_top * args.confirm_seeds * args.epochs


def budget_plans(args: Any, space: Any) -> dict[str, dict[str, int]]:
    """Most trials and trial-epoch budget of each method's search, so that each spends about ``--budget``.

    Random search runs whole trials: budget / epochs of them. The TPE + ASHA sweeps stop at their budget
    (``sweep.run --budget``), at most bench.sweep_runs.trial_cap trials."""
    from sweep.schedule import Asha

    asha = Asha.for_trials(args.epochs, space.asha.get("grace_period"), space.asha.get("reduction_factor"))
    confirm = confirm_epochs(args)
    search = args.budget - confirm
    return {"default": {"trials": 1},
            "random": {"trials": args.budget // args.epochs, "budget": args.budget},
            "tpe-asha": {"trials": trial_cap(asha, args.budget), "budget": args.budget},
            "tpe-asha-confirm": {"trials": trial_cap(asha, search), "budget": search,
                                 "confirm_epochs": confirm}}


def _run_all(args: Any, data_path: Path, base: Any, plans: dict[str, dict[str, int]],
             results_root: Path) -> list[dict[str, Any]]:
    from core.data.dataset import load_for_config

    data = load_for_config(str(data_path), base, progress=False)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            started = time.time()
            log.info("seed %d: %s", seed, method)
            if method == "default":
                chosen = _default_run(base, data, seed, results_root / f"default-seed{seed}")
            else:
                chosen = _sweep_run(args, data_path, method, plans[method], seed, results_root)
            chosen.update(method=method, seed=seed, wall_s=round(time.time() - started, 1),
                          **checkpoint_scores(chosen["folders"], data))
            runs.append(chosen)
            print(f"seed {seed} {method}: val {chosen['val']:.4f} test {chosen['test_balanced_accuracy']:.4f} "
                  f"({chosen['trial_epochs']} trial-epochs, {chosen['wall_s']:.0f} s)", flush=True)
    return runs


def _default_run(base: Any, data: Any, seed: int, out: Path) -> dict[str, Any]:
    import dataclasses

    from core.train import RunOptions, train

    result = train(dataclasses.replace(base, seed=seed), data, out, options=RunOptions(tensorboard=False,
                                                                                       progress=False))
    return {"folders": [str(out)], "trials": 1, "trial_epochs": result.epochs_run,
            "selection_value": result.last_metrics[METRIC]}


def _sweep_run(args: Any, data_path: Path, method: str, plan: dict[str, int], seed: int,
               results_root: Path) -> dict[str, Any]:
    from sweep.settings import SweepSettings

    confirm = method == "tpe-asha-confirm"
    return sweep_run(SweepSettings(
        name=f"{method}-seed{seed}", results=str(results_root), space=args.space, data=str(data_path), metric=METRIC,
        max_epochs=args.epochs, scheduler="none" if method == "random" else "asha",
        sampler="random" if method == "random" else "tpe", trials=plan["trials"], budget=plan["budget"], seed=seed,
        overrides=(f"seed={seed}",), gpus=0, cpus_per_trial=args.cpus_per_trial,
        confirm_top=args.confirm_top if confirm else 0, confirm_seeds=args.confirm_seeds))


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and sd over the seeds of each method's figures, and its test gain over the others, paired by seed."""
    out: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        out[method] = {key: mean_sd([r[key] for r in rows]) for key in
                       ("trials", "trial_epochs", "val", "test_balanced_accuracy", "drop", "test_accuracy", "wall_s")}
        out[method]["test_gain_over"] = {
            other: mean_sd([r["test_balanced_accuracy"] - o["test_balanced_accuracy"]
                             for r in rows for o in runs if o["method"] == other and o["seed"] == r["seed"]])
            for other in METHODS if other != method and any(o["method"] == other for o in runs)}
    return out


def table(summary: dict[str, dict[str, Any]], runs: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | trials | trial-epochs | val bal acc (chosen) | TEST bal acc | val - test | TEST acc |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in summary.items():
        lines.append(f"| {method} | {cell(s['trials'], 1)} | {cell(s['trial_epochs'], 0)} | {cell(s['val'])} | "
                     f"{cell(s['test_balanced_accuracy'])} | {cell(s['drop'])} | {cell(s['test_accuracy'])} |")
    lines += ["", "test balanced accuracy, method minus method (paired by seed, mean +- sd):"]
    for method, s in summary.items():
        gains = ", ".join(f"- {other}: {cell(g)}" for other, g in s["test_gain_over"].items() if g["n"])
        lines.append(f"  {method} {gains}")
    lines += ["", "per seed: method  val  test  drop  trial-epochs"]
    for r in runs:
        lines.append(f"  seed {r['seed']} {r['method']:<17} {r['val']:.4f} {r['test_balanced_accuracy']:.4f} "
                     f"{r['drop']:+.4f} {r['trial_epochs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
