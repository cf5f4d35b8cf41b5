"""What a sweep costs beyond its trials' own training: wall time, concurrency, start-up, trials/hour.

    python -m bench.sweep_overhead --out sweep-cpu.json                        # CPU: 8 trials, 32 px
    python -m bench.sweep_overhead --gpus-per-trial 1 0.5 0.25 --out sweep-gpu.json   # GPU sharing

Runs ``python -m sweep.run`` (a subprocess: the command users run, Ray start-up included) with
``--trials`` short trials of ``--space`` (default search_spaces/quick.yaml, no early stopping), once
per ``--gpus-per-trial`` value, and reads what the sweep leaves behind (trials/<id>/trial.json,
metrics.csv and run.json) to report:

- wall time of the command against the sum of the trials' own training time (``train_epoch_s``, the
  training loop only) and of their durations (as Ray timed them), and the slot efficiency
  sum(training time) / (wall time x slots);
- achieved concurrency: the time-weighted mean number of trials running, over the whole command and
  over the span from the first trial's start to the last one's end, against the slots;
- the time from the command's start to the first trial's first training step (which core.train
  records in the trial's run.json);
- trials per hour and, on a GPU, its mean utilisation while trials ran.

Runs on ``../shared/data/ham10000-200x150`` when it is there, else on generated data (core.data.demo_data),
and says which. ``--out`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.common import (REPO, GpuUtilization, bench_data, bench_parser, command_line, machine_info,
                          write_result, work_folder)
from core import filenames
from core.device import usable_cpus
from core.errors import UserError, run_cli

log = logging.getLogger(__name__)

DEFAULT_SPACE = "search_spaces/quick.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    gpus_visible = torch.cuda.device_count()
    gpus = gpus_visible if args.gpus is None else args.gpus
    if gpus > gpus_visible:
        raise UserError(f"--gpus {gpus}: this machine has {gpus_visible} GPU(s)")
    shares = args.gpus_per_trial or ([1.0] if gpus else [0.0])
    if gpus == 0 and any(shares):
        raise UserError("--gpus-per-trial needs a GPU; this run has none (--gpus 0 or no GPU here)")
    image_size = args.image_size or (224 if gpus else 32)
    source = bench_data(args.data, demo_lesions=args.demo_lesions, demo_image_size=max(64, image_size))
    log.info("data: %s at %s", source.source, source.path)

    with work_folder(args.results, "bench-sweep-") as results_root:
        runs = [_run_sweep(args, source.path, results_root, gpus, share, image_size) for share in shares]

    device = torch.device("cuda" if gpus else "cpu")
    result = {
        "benchmark": "sweep_overhead",
        "command": command_line(__spec__.name, argv),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(device),
        "data": {"source": source.source, "path": str(source.path)},
        "settings": {"trials": args.trials, "max_epochs": args.max_epochs, "space": args.space,
                     "image_size": image_size, "batch_size": args.batch_size, "gpus": gpus,
                     "cpus_per_trial": args.cpus_per_trial, "overrides": args.overrides},
        "runs": runs,
    }
    _print(result)
    write_result(result, args.out)
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.sweep_overhead", __doc__)
    parser.add_argument("--trials", type=int, default=8, help="trials per sweep (default 8)")
    parser.add_argument("--max-epochs", type=int, default=2, help="epochs per trial (default 2)")
    parser.add_argument("--space", default=DEFAULT_SPACE, help=f"search space (default {DEFAULT_SPACE})")
    parser.add_argument("--image-size", type=int, help="default: 224 with GPUs, 32 on the CPU")
    parser.add_argument("--batch-size", type=int, help="default: the space's")
    parser.add_argument("--gpus", type=int, help="GPUs the sweep uses (default: all visible)")
    parser.add_argument("--gpus-per-trial", type=float, nargs="+", metavar="F",
                        help="one sweep per value, e.g. 1 0.5 0.25 (default 1 with GPUs)")
    parser.add_argument("--cpus-per-trial", type=int, help="passed to sweep.run (default: its own choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key fixed for every trial (passed to sweep.run)")
    parser.add_argument("--results", help="keep the sweeps in this folder (default: a temporary one, removed)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one sweep may take (default 3600)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.max_epochs < 1:
        parser.error("--trials and --max-epochs must be at least 1")
    return args


def _run_sweep(args: argparse.Namespace, data: Path, results_root: Path, gpus: int, share: float,
               image_size: int) -> dict[str, Any]:
    """One ``python -m sweep.run``, timed from outside, and the figures read from what it wrote."""
    name = f"bench-{share:g}gpu" if gpus else "bench-cpu"
    command = [sys.executable, "-m", "sweep.run", "--data", str(data), "--trials", str(args.trials),
               "--max-epochs", str(args.max_epochs), "--space", str(Path(args.space).resolve()),
               "--scheduler", "none", "--confirm-top", "0", "--name", name, "--results", str(results_root), "--gpus", str(gpus),
               "--set", f"image_size={image_size}"]
    if args.batch_size:
        command += ["--set", f"batch_size={args.batch_size}"]
    if gpus:
        command += ["--gpus-per-trial", f"{share:g}"]
    if args.cpus_per_trial:
        command += ["--cpus-per-trial", str(args.cpus_per_trial)]
    for override in args.overrides:
        command += ["--set", override]
    results_root.mkdir(parents=True, exist_ok=True)
    log_path = results_root / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log.info("running %s", " ".join(command))
    device = torch.device("cuda") if gpus else torch.device("cpu")
    with open(log_path, "w", encoding="utf-8") as output, GpuUtilization(device, interval_s=0.5) as utilization:
        started = time.time()
        try:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            raise UserError(f"sweep.run took over --timeout {args.timeout:g} s; its output is in {log_path}") \
                from None
        ended = time.time()
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        raise UserError(f"sweep.run exited with status {code}; its output is in {log_path}")
    figures, (first, last) = sweep_figures(results_root / name, started, ended,
                                           slots=_slots(results_root / name, gpus))
    figures["gpus_per_trial"] = share
    figures["gpu_utilization_pct"] = utilization.mean_within([(first, last)])
    return figures


def _slots(sweep_dir: Path, gpus: int) -> int:
    """How many trials the sweep ran at once, as sweep.run planned it (same function, same inputs)."""
    from sweep.resources import plan_resources
    from sweep.settings import load_settings

    settings = load_settings(sweep_dir)
    cpus = usable_cpus()
    return plan_resources(settings, cpus, gpus, "this machine").slots


def sweep_figures(sweep_dir: Path, started: float, ended: float,
                  slots: int) -> tuple[dict[str, Any], tuple[float, float]]:
    """The overhead figures of one finished sweep in ``sweep_dir``, run from ``started`` to ``ended``
    (Unix times), and the span from its first trial's start to its last trial's end."""
    import pandas as pd

    from sweep.outputs import read_trials, trials_dir

    records = read_trials(sweep_dir)
    if not records:
        raise UserError(f"{sweep_dir}: the sweep left no trial records")
    intervals, train_s, duration_s = [], 0.0, 0.0
    for record in records:
        if record.get("started") is None or record.get("ended") is None:
            raise UserError(f"{sweep_dir}: trial {record['trial_id']} has no start or end time in its trial.json")
        intervals.append((float(record["started"]), float(record["ended"])))
        duration_s += float(record.get("duration_s") or 0.0)
        metrics = trials_dir(sweep_dir) / record["trial_id"] / filenames.METRICS_CSV
        if metrics.is_file():
            train_s += float(pd.read_csv(metrics)["train_epoch_s"].sum())
    wall = ended - started
    first_start = min(s for s, _ in intervals)
    last_end = max(e for _, e in intervals)
    running = sum(e - s for s, e in intervals)
    first = min(records, key=lambda r: r["started"])
    first_step = _first_step_at(trials_dir(sweep_dir) / first["trial_id"])
    statuses: dict[str, int] = {}
    for record in records:
        statuses[record.get("status", "?")] = statuses.get(record.get("status", "?"), 0) + 1
    figures = {
        "trials": len(records), "statuses": statuses, "slots": slots,
        "wall_s": round(wall, 2),
        "trials_train_s": round(train_s, 2), "trials_duration_s": round(duration_s, 2),
        "slot_efficiency": round(train_s / (wall * slots), 3),
        "mean_concurrency": round(running / wall, 2),
        "mean_concurrency_while_trials_ran": round(running / (last_end - first_start), 2),
        "max_concurrency": _max_overlap(intervals),
        "first_trial_start_s": round(first_start - started, 2),
        "first_step_after_s": None if first_step is None else round(first_step - started, 2),
        "trials_per_hour": round(len(records) / wall * 3600, 1),
    }
    return figures, (first_start, last_end)


def _first_step_at(run_dir: Path) -> float | None:
    """Unix time of the trial's first training step, as core.train recorded it in run.json."""
    metrics = run_dir / filenames.RUN_STATE
    if not metrics.is_file():
        return None
    return json.loads(metrics.read_text(encoding="utf-8")).get("first_step_unix_time")


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda t: (t[0], t[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def _print(result: dict[str, Any]) -> None:
    settings = result["settings"]
    print(f"data: {result['data']['source']} ({result['data']['path']}); {settings['trials']} trials x "
          f"{settings['max_epochs']} epochs at {settings['image_size']} px; machine: "
          f"{result['machine'].get('gpu') or result['machine']['cpu']}, {result['machine']['cpus']} CPUs")
    for run in result["runs"]:
        share = f"{run['gpus_per_trial']:g} GPU/trial" if run["gpus_per_trial"] else "CPU"
        util = run["gpu_utilization_pct"]
        print(f"  {share}: wall {run['wall_s']:.1f} s, trials' training {run['trials_train_s']:.1f} s "
              f"(durations {run['trials_duration_s']:.1f} s), {run['slots']} slots, slot efficiency "
              f"{run['slot_efficiency']:.2f}; concurrency {run['mean_concurrency']:.2f} "
              f"({run['mean_concurrency_while_trials_ran']:.2f} while trials ran, max {run['max_concurrency']}); "
              f"first step after {run['first_step_after_s']} s; {run['trials_per_hour']:.0f} trials/h"
              + (f"; GPU {util:.0f}% busy" if util is not None else ""))


if __name__ == "__main__":
    run_cli(main)
