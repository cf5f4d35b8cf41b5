"""How the commands meet broken state, unwritable places and a full disk, tried as a user would (issue 15).

    python -m bench.fault_table [--repo CHECKOUT] [--work DIR] [--only NAME ...]

Runs the commands of CHECKOUT (default: this one; give an older checkout to see its behaviour) as
subprocesses on the built-in demo data (its own copy, in ``--work``'s dataset cache), 32 px, 2 epochs, no
pretrained weights: a 2-trial sweep, its final training and single runs. Then it damages each state file
(cut to half its size, or garbage bytes), points outputs at impossible places, fills a small disk and
kills runs with SIGKILL, runs the command again, and prints one table row per fault: the exit status,
whether a traceback was printed, stderr's last line, and what was left behind.

The full-disk and read-only rows mount a tmpfs (root only); elsewhere they say "skipped". Every
command gets ``--threads 2``; the sweep ``--gpus 0``. Takes about 5 minutes on 2 CPU cores.

The scenarios: optuna.db, sweep.json, splits.csv and Ray's experiment state of a finished sweep, then
``--resume``; best.json, then ``core.final_train``; best.pt and run.json of a finished final training,
then the same command; model.pt, then ``core.evaluate``/``core.predict``; last.pt of an interrupted run
and the decoded-image cache, then the same ``core.train``; every command's output under a file; a
read-only ``--out``; a disk that fills up during a checkpoint; five SIGKILLs of ``core.train`` and of
``core.final_train`` at seeded random moments, then the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from bench.common import REPO, work_folder

TRAIN_SETTINGS = ["--set", "image_size=32", "--set", "epochs=2", "--set", "pretrained=none",
                  "--set", "batch_size=32", "--threads", "2"]


class Table:
    """The commands' environment, and the rows printed at the end."""

    def __init__(self, repo: Path, work: Path) -> None:
        self.repo, self.work = repo, work
        self.env = {**os.environ, "PYTHONPATH": str(repo), "LESION_SWEEP_CACHE": str(work / "cache"),
                    "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        self.rows: list[tuple[str, str, str]] = []

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=self.repo, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=self.repo, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def row(self, fault: str, command: str, proc: subprocess.CompletedProcess | None, *notes: str) -> None:
        what = outcome(proc) if proc is not None else ""
        self.rows.append((fault, command, "; ".join(p for p in (what, *notes) if p)))
        print(f"| {fault} | `{command}` | {self.rows[-1][2]} |", flush=True)


def outcome(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "(no stderr)"
    if len(last) > 230:
        last = last[:227] + "..."
    traceback = "Traceback" in proc.stderr
    if proc.returncode == 0:
        return "exit 0"
    return f"exit {proc.returncode}, {'traceback: ' if traceback else 'one line: '}`{last}`"


def cut_short(path: Path) -> None:
    """What a full disk or an interrupted copy leaves: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(max(64, min(path.stat().st_size, 4096))))


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tmp"))


def mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def kill_runs(table: Table, args: Sequence[str], started: Path, seed: int, kills: int = 5,
              window_s: float = 3.0) -> list[str]:
    """Start the command ``kills`` times and SIGKILL it at a seeded random moment after ``started`` appears."""
    rng = random.Random(seed)
    when = []
    for _ in range(kills):
        proc = table.start(*args)
        while not started.exists() and proc.poll() is None:
            time.sleep(0.05)
        delay = rng.uniform(0, window_s)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            when.append(f"{delay:.1f}s")
        else:
            when.append(f"ended before {delay:.1f}s")
        proc.wait()
    return when


def with_restore(folder: Path, damage: Callable[[], None], command: Callable[[], subprocess.CompletedProcess],
                 notes: list[str] | None = None, after: Callable[[], str] | None = None) -> subprocess.CompletedProcess:
    """Damage ``folder``, run the command, note ``after()`` of what it left, then put the folder back."""
    backup = folder.with_name(folder.name + ".backup")
    shutil.copytree(folder, backup, symlinks=True)
    try:
        damage()
        proc = command()
        if after is not None and notes is not None:
            notes.append(after())
        return proc
    finally:
        shutil.rmtree(folder)
        backup.rename(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fault_table", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose commands run (default: this one)")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder, removed at the end)")
    parser.add_argument("--only", nargs="*", default=None, choices=("sweep", "final", "train", "places"),
                        help="run only these groups of rows")
    args = parser.parse_args(argv)
    groups = set(args.only or ("sweep", "final", "train", "places"))
    with work_folder(args.work, "fault-table-") as work:
        work.mkdir(parents=True, exist_ok=True)
        table = Table(Path(args.repo).resolve(), work)
        print(f"checkout {table.repo}; scratch {work}\n\n| fault | command | what happens |\n|---|---|---|",
              flush=True)
        try:
            if groups & {"sweep", "final"}:
                sweep_and_final_rows(table, groups)
            if "train" in groups:
                train_rows(table)
            if "places" in groups:
                place_rows(table)
        finally:
            for mount in (work / "full", work / "readonly"):
                unmount(mount)  # before the folder goes: a mounted file system cannot be removed
    return 0


def sweep_and_final_rows(table: Table, groups: set[str]) -> None:
    results = table.work / "results"
    sweep = results / "s"
    first = table.run("sweep.run", "--space", "search_spaces/quick.yaml", "--trials", "2", "--gpus", "0",
                      "--name", "s", "--results", str(results))
    if first.returncode != 0:
        table.row("(set-up: a 2-trial sweep)", "sweep.run", first)
        return
    resume = ("sweep.run", "--resume", "--name", "s", "--results", str(results))
    if "sweep" in groups:
        for fault, name, damage in (("optuna.db of a sweep cut short", "optuna.db", cut_short),
                                    ("optuna.db of a sweep garbage", "optuna.db", garbage),
                                    ("sweep.json damaged (garbage bytes)", "sweep.json", garbage),
                                    ("splits.csv of a sweep cut short", "splits.csv", cut_short)):
            proc = with_restore(sweep, lambda: damage(sweep / name), lambda: table.run(*resume))
            table.row(fault + ", then --resume", "sweep.run --resume", proc)
        states = sorted((sweep / "ray").glob("experiment_state-*.json"))
        def count() -> str:
            return f"trials afterwards: {len(list((sweep / 'trials').iterdir()))} (the sweep had 2)"

        notes: list[str] = []
        proc = with_restore(sweep, lambda: [cut_short(p) for p in states], lambda: table.run(*resume), notes, count)
        table.row("Ray's experiment state (ray/experiment_state-*.json) cut short, then --resume",
                  "sweep.run --resume", proc, *notes)
        notes = []
        proc = with_restore(sweep, lambda: [garbage(p) for p in (sweep / "ray").glob("searcher-state-*.pkl")],
                            lambda: table.run(*resume), notes, count)
        table.row("Ray's searcher state (ray/searcher-state-*.pkl) garbage, then --resume", "sweep.run --resume",
                  proc, *notes)

        def killed_while_writing_outputs() -> None:  # what a driver killed then leaves: old versions or none
            for name in ("best.json", "trials.csv", "summary.txt"):
                (sweep / name).rename(sweep / f".{name}.k1ll3d.tmp")

        def rebuilt() -> str:
            there = [n for n in ("best.json", "trials.csv", "summary.txt") if (sweep / n).is_file()]
            return f"there afterwards: {', '.join(there) or 'none'}; {len(temp_files(sweep))} temp file(s) left"

        notes = []
        proc = with_restore(sweep, killed_while_writing_outputs, lambda: table.run(*resume), notes, rebuilt)
        table.row("a driver killed while writing best.json, trials.csv, summary.txt (none there, their temp "
                  "files left), then --resume", "sweep.run --resume", proc, *notes)
    if "final" not in groups:
        return
    best = sweep / "best.json"
    final = ("core.final_train", str(best), "--gallery", "1", "--threads", "2")
    proc = with_restore(sweep, lambda: cut_short(best), lambda: table.run(*final))
    table.row("best.json cut short, then the final training", "core.final_train best.json", proc)
    done = table.run(*final)
    if done.returncode != 0:
        table.row("(set-up: the final training)", "core.final_train", done)
        return
    for fault, name in (("best.pt of a finished final training cut short", "best.pt"),
                        ("run.json of a finished final training cut short", "run.json")):
        proc = with_restore(sweep, lambda: cut_short(sweep / "final" / name), lambda: table.run(*final))
        table.row(fault + ", then the same command", "core.final_train best.json", proc)
    model = sweep / "final" / "model.pt"
    image = next((table.work / "cache").rglob("*.jpg"))
    proc = with_restore(sweep, lambda: cut_short(model), lambda: table.run(
        "core.evaluate", str(model), "--out", str(table.work / "eval"), "--gallery", "0",
        "--data", str(image.parents[1])))
    table.row("model.pt cut short, then core.evaluate", "core.evaluate model.pt", proc)
    proc = with_restore(sweep, lambda: garbage(model), lambda: table.run("core.predict", str(model), str(image)))
    table.row("model.pt garbage, then core.predict", "core.predict model.pt IMAGE", proc)
    # Five SIGKILLs of the final training at random moments after it claims its folder, then the same command.
    out = table.work / "final-killed"
    killed = (*final, "--out", str(out))
    moments = kill_runs(table, killed, out / "source.json", seed=1, window_s=8.0)
    left = temp_files(out)
    proc = table.run(*killed)
    evaluation = out / "metrics.json"
    table.row("kill -9 of `core.final_train` at five random moments, then the same command",
              "core.final_train best.json --out DIR", proc, f"killed at {', '.join(moments)}",
              f"{len(left)} temp file(s) after the kills, {len(temp_files(out))} after the last run",
              f"metrics.json {'written' if evaluation.is_file() else 'missing'}")


def train_rows(table: Table) -> None:
    out = table.work / "run"
    train = ("core.train", "--out", str(out), *TRAIN_SETTINGS)

    def stop_after_first_epoch() -> None:
        proc = table.start(*train)
        while not (out / "last.pt").exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    stop_after_first_epoch()
    cut_short(out / "last.pt")
    proc = table.run(*train)
    table.row("a run's last.pt cut short, then the same command", "core.train --out DIR", proc)
    shutil.rmtree(out)

    moments = kill_runs(table, train, out / "config.json", seed=0, window_s=4.0)
    left = temp_files(out)
    proc = table.run(*train)
    status = json.loads((out / "run.json").read_text()).get("status") if (out / "run.json").is_file() else None
    table.row("kill -9 of `core.train` at five random moments, then the same command", "core.train --out DIR",
              proc, f"killed at {', '.join(moments)}",
              f"{len(left)} temp file(s) after the kills, {len(temp_files(out))} after the last run",
              f"run.json status {status}")
    shutil.rmtree(out)

    caches = sorted((table.work / "cache" / "images").glob("*-32px.npy"))
    for cache in caches:
        cut_short(cache)
    proc = table.run(*train)
    warned = [line for line in proc.stderr.splitlines() if "cache" in line and "WARNING" in line]
    table.row("the decoded-image cache cut short, then core.train", "core.train --out DIR", proc,
              f"warning: `{warned[0].split(': ', 1)[-1][:150]}`" if warned else "no warning")
    shutil.rmtree(out)

    full = table.work / "full"
    if mount_tmpfs(full, "size=100m"):
        proc = table.run("core.train", "--out", str(full / "run"), *TRAIN_SETTINGS)
        left = temp_files(full)
        run_json = full / "run" / "run.json"
        table.row("the disk fills up while a run writes its checkpoint (100 MB tmpfs)", "core.train --out DIR",
                  proc, f"{len(left)} temp file(s) left",
                  f"run.json {json.loads(run_json.read_text())['status'] if run_json.is_file() else 'absent'}")
        unmount(full)
    else:
        table.row("the disk fills up while a run writes its checkpoint", "core.train", None,
                  "skipped: cannot mount a tmpfs here (not root?)")


def place_rows(table: Table) -> None:
    blocker = table.work / "a-file"
    blocker.write_text("not a folder\n")
    proc = table.run("core.train", "--out", str(blocker / "run"), *TRAIN_SETTINGS)
    table.row("`--out` below a path that is a file", "core.train --out FILE/run", proc)
    proc = table.run("core.train", "--out", str(blocker), *TRAIN_SETTINGS)
    table.row("`--out` is a file", "core.train --out FILE", proc)
    readonly = table.work / "readonly"
    if mount_tmpfs(readonly, "size=1m,ro"):
        proc = table.run("core.train", "--out", str(readonly / "run"), *TRAIN_SETTINGS)
        table.row("`--out` on a read-only file system", "core.train --out RO/run", proc)
        unmount(readonly)
    else:
        table.row("`--out` on a read-only file system", "core.train", None, "skipped: cannot mount a tmpfs here")
    proc = table.run("sweep.run", "--space", "search_spaces/quick.yaml", "--trials", "1", "--gpus", "0",
                     "--results", str(blocker / "results"))
    table.row("`--results` below a file", "sweep.run --results FILE/results", proc)
    sweep = table.work / "results" / "s"
    if (sweep / "best.json").is_file():
        proc = table.run("core.final_train", str(sweep / "best.json"), "--out", str(blocker / "final"))
        table.row("`--out` below a file", "core.final_train best.json --out FILE/final", proc)
        model = sweep / "final" / "model.pt"
        if model.is_file():
            image = next((table.work / "cache").rglob("*.jpg"))
            proc = table.run("core.evaluate", str(model), "--data", str(image.parents[1]), "--out",
                             str(blocker / "eval"))
            table.row("`--out` below a file", "core.evaluate model.pt --out FILE/eval", proc)
            proc = table.run("core.predict", str(model), str(image), "--gradcam", str(blocker / "cams"))
            table.row("`--gradcam` below a file", "core.predict model.pt IMAGE --gradcam FILE/cams", proc)


if __name__ == "__main__":
    sys.exit(main())
