"""A sweep's own state checked before ``python -m sweep.run --resume`` restores it: Optuna's optuna.db and Ray
Tune's experiment state. Damage is one line naming the file and what to do (core/errors.py), instead of
Ray logging a traceback and starting the sweep over with every trial run again.

Not a command; sweep/run.py calls :func:`check_resumable`.
"""

from __future__ import annotations

import json
import os
import pickletools
import sqlite3
from contextlib import closing
from pathlib import Path

from core.io import atomic
from core.errors import UserError
from core.filenames import OPTUNA_DB
from core.io.state_files import file_size, short_reason
from sweep.outputs import EXPERIMENTS

# Ray Tune's experiment state in ray/ and ray-confirm/ (the newest of each, by name), checked before --resume
# restores it; search_gen_state-*.json is a pickle despite its name.
RAY_STATE = {"json_files": ("experiment_state-*.json",),
             "pickles": ("search_gen_state-*.json", "searcher-state-*.pkl", "tuner.pkl")}


def check_resumable(folder: Path) -> None:
    """Before --resume: damaged optuna.db or Ray state is a one-line error; a killed driver's temp files go."""
    if (folder / OPTUNA_DB).exists():
        check_sqlite(folder / OPTUNA_DB, "start a new sweep with another --name", tables=("studies", "trials"))
    for experiment in EXPERIMENTS.values():
        check_newest(folder / experiment, "the sweep cannot be continued: start a new one with another --name",
                     **RAY_STATE)
    atomic.remove_stale_temps(folder, ("*", "trials/*/*"))


def check_sqlite(path: str | os.PathLike, advice: str, tables: tuple[str, ...] = ()) -> None:
    """The SQLite database at ``path`` must exist, pass SQLite's own check and hold ``tables``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; {advice}")
    try:
        with closing(sqlite3.connect(path)) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            present = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as exc:
        raise UserError(f"{path}: damaged, not a readable SQLite database ({file_size(path)}, {short_reason(exc)}); "
                        f"{advice}") from None
    if verdict != "ok":
        raise UserError(f"{path}: damaged SQLite database ({short_reason(verdict)}); {advice}")
    missing = [t for t in tables if t not in present]
    if missing:
        raise UserError(f"{path}: no table '{missing[0]}' in it ({file_size(path)}; cut short or another "
                        f"database?); {advice}")


def check_newest(folder: str | os.PathLike, advice: str, json_files: tuple[str, ...] = (),
                 pickles: tuple[str, ...] = ()) -> None:
    """For each glob pattern, the file of ``folder`` that sorts last by name (the newest of timestamped names,
    as Ray Tune picks its experiment state) must be whole: ``json_files`` parse, ``pickles`` are complete
    pickle streams (their opcodes are scanned; nothing is loaded)."""
    for pattern in (*json_files, *pickles):
        found = sorted(Path(folder).glob(pattern))
        if not found:
            continue
        path = found[-1]
        try:
            if pattern in json_files:
                json.loads(path.read_text(encoding="utf-8"))
            else:
                with open(path, "rb") as handle:
                    for _ in pickletools.genops(handle):
                        pass
        except (OSError, ValueError) as exc:  # ValueError: JSON, UTF-8 and pickle opcode errors
            raise UserError(f"{path}: damaged ({file_size(path)}, {short_reason(exc)}); {advice}") from None
