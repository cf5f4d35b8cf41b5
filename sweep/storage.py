"""A sweep in a bucket (``python -m sweep.run --storage s3://bucket/prefix``): what goes where, and who copies it.

Not a command. The sweep ``NAME`` lives in ``s3://bucket/prefix/NAME/`` with the layout of ``results/NAME/``
(sweep/outputs.py):

- ``ray/``, ``ray-confirm/``: Ray Tune's experiment state and trial checkpoints, written there by Ray itself
  (``RunConfig(storage_path=..., storage_filesystem=...)``; each worker uploads its own checkpoints);
- ``trials/<id>/``: each trial's run (metrics.csv, run.json, config.json, splits.csv, best.pt, TensorBoard
  events, node.json), uploaded by the trial itself after every epoch and at its end (:class:`TrialFiles`);
  last.pt stays out: it travels as Ray's checkpoint. Ray's ``SyncConfig(sync_artifacts=True)`` is not used:
  it uploads a trial's working folder at each report only, so run.json's final "complete" state, written after
  the last report, would never arrive, and it would upload last.pt a second time every epoch;
- the driver's files (sweep.json, space.yaml, splits.csv, optuna.db, confirm.json, trials.csv, summary.txt,
  best.json, report.html) and its part of each trial folder (trial.json, the HParams event files): written in
  the driver's local ``results/NAME/`` as without storage, and uploaded after each change (:class:`SweepStorage`).

The driver reads what trials wrote only from the bucket: before it reads a trial's files it downloads them
into its local ``results/NAME/trials/<id>/`` (never a worker's own folder). ``--resume`` on a machine with an
empty ``results/`` downloads the sweep's files first and restores Ray's experiment from the bucket.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from core import filenames
from core.errors import UserError
from core.io.storage import Store, StorageError, atomic_temp, excluded, open_store, storage_fault

log = logging.getLogger(__name__)

SETTINGS_FILE = filenames.SWEEP_SETTINGS    # a folder holding it holds a sweep
TRIALS = filenames.TRIALS_DIR
RAY_FOLDERS = ("ray", "ray-confirm")
# resume state: Ray's checkpoint carries it
WORKER_SKIPS = (filenames.LAST_CHECKPOINT, ".checkpoint-*", ".checkpoint-*/*")
# Ray's loggers that log a storage failure with its traceback: "Trial task failed", "Saving experiment state to
# storage ... failed", "Caught exception when creating directory"
RAY_STORAGE_LOGS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state",
                    "ray.train._internal.storage")
DRIVER_SKIPS = ("*.pt",)           # what the driver never downloads of a trial (models: fetch them when needed)


class _OneLineStorageFaults(logging.Filter):
    """Ray logs a failed trial, or a failed upload of its experiment state, with a traceback: for a storage
    failure, one line instead (the driver then stops with its own one-line error, and --resume trains the trial
    on); other failures keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        cause = getattr(error, "cause", None) or error   # Ray's RayTaskError holds the trial's own exception
        if cause is not None and storage_fault(f"{type(cause).__name__}: {cause}"):
            record.msg, record.args = f"{record.getMessage()}: {' '.join(str(cause).split())}", ()
            record.exc_info, record.exc_text = None, None
        return True


ONE_LINE_STORAGE_FAULTS = _OneLineStorageFaults()


def _noted(method: Callable[..., Any]) -> Callable[..., Any]:
    """Keep the first StorageError of a driver-side copy in ``self.failure`` (see :meth:`noting_failure`)."""
    @functools.wraps(method)
    def noted(self: SweepStorage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StorageError as exc:
            self.failure = self.failure or exc
            raise
    return noted


class SweepStorage:
    """The driver's side: checks before any trial, uploads of its files, downloads of the trials' files."""

    def __init__(self, store: Store):
        self.store = store                         # s3://bucket/prefix/NAME
        self._fetched: dict[str, set[str]] = {}    # trial id -> files downloaded from the bucket (not ours)
        self.failure: StorageError | None = None   # the first failure inside a Tune run (Tune wraps it)

    @contextmanager
    def noting_failure(self) -> Iterator[None]:
        """Around a Tune run: a storage failure in a callback (Ray Tune re-raises it as a TuneError holding a
        traceback) ends it as one line saying how to go on."""
        # For the rest of the process, not only this run: Ray also builds its storage folders outside the run
        # (a Tuner's set-up, the confirmation stage's), and logs a fault there with a traceback too.
        for name in RAY_STORAGE_LOGS:
            logging.getLogger(name).addFilter(ONE_LINE_STORAGE_FAULTS)   # addFilter adds it once
        try:
            yield
        except Exception:
            if self.failure is None:
                raise
            raise StorageError(f"{self.failure}; the sweep stopped: once the storage is back, python -m sweep.run "
                               f"--resume --name {self.uri.rsplit('/', 1)[-1]} --storage "
                               f"{self.uri.rsplit('/', 1)[0]} continues it") from None

    @classmethod
    def open(cls, uri: str, endpoint: str | None, name: str) -> "SweepStorage":
        return cls(open_store(uri, endpoint).child(name))

    @property
    def uri(self) -> str:
        return self.store.uri

    def run_config(self) -> dict[str, Any]:
        """Ray Tune's RunConfig arguments that put a stage's experiment in the bucket."""
        return {"storage_path": self.store.root, "storage_filesystem": self.store.fs}

    def check_new(self) -> None:
        """Before a new sweep: the bucket is usable and ``prefix/NAME`` holds nothing (another sweep's files)."""
        self.store.check()
        if self.store.exists(SETTINGS_FILE):
            raise UserError(f"{self.uri} already holds a sweep: --resume continues it, or choose another --name")
        found = self.store.files()
        if found:
            raise UserError(f"{self.uri} already holds files ({found[0]}, {len(found)} in all) that are not a sweep; "
                            f"choose another --name or --storage prefix")

    def fetch_sweep(self, folder: Path) -> None:
        """Before --resume: the sweep's files (not Ray's state, not the models) into the local ``folder``."""
        self.store.check()
        if not self.store.exists(SETTINGS_FILE):
            raise UserError(f"{self.uri}: no sweep to resume there ({SETTINGS_FILE} is missing); check --storage "
                            f"and --name")
        skips = (*(f"{r}/*" for r in RAY_FOLDERS), *(f"{TRIALS}/*/{p}" for p in DRIVER_SKIPS))
        count = self.store.download_tree("", folder, exclude=skips)
        log.info("downloaded %d file(s) of %s into %s", count, self.uri, folder)

    @_noted
    def push_driver(self, folder: Path) -> None:
        """Upload the driver's own files at the top of ``folder`` (optuna.db, trials.csv, best.json, ...)."""
        for path in sorted(folder.iterdir()):
            if path.is_file() and not atomic_temp(path.name):
                self.store.upload_file(path, path.name)

    @_noted
    def fetch_trial(self, folder: Path, trial_id: str) -> None:
        """The trial's files as its worker uploaded them, into ``folder/trials/<id>/`` (models left out)."""
        rel = f"{TRIALS}/{trial_id}"
        names = {n for n in self.store.files(rel)}
        local = folder / TRIALS / trial_id
        self.store.download_tree(rel, local, exclude=DRIVER_SKIPS)
        self._fetched.setdefault(trial_id, set()).update(str(Path(n).relative_to(rel)) for n in names)

    @_noted
    def push_trial_record(self, folder: Path, trial_id: str) -> None:
        """Upload what the driver wrote in ``trials/<id>/`` (trial.json, HParams events), not what it fetched."""
        local = folder / TRIALS / trial_id
        fetched = self._fetched.get(trial_id, set())
        for path in sorted(p for p in local.iterdir() if p.is_file()) if local.is_dir() else []:
            name = path.name
            if (name not in fetched or name == filenames.TRIAL_RECORD) and not atomic_temp(name) and not name.endswith(".pt"):
                self.store.upload_file(path, f"{TRIALS}/{trial_id}/{name}")

    @_noted
    def push_records(self, folder: Path) -> None:
        """Upload every trial's record (trial.json) and the driver's files: after a stage, and at the end."""
        for record in sorted((folder / TRIALS).glob("*/trial.json")):
            self.store.upload_file(record, f"{TRIALS}/{record.parent.name}/trial.json")
        self.push_driver(folder)

    @_noted
    def stop_for(self, trial_id: str, error: str) -> None:
        """A trial failed because the storage did (even if the driver reaches it again): the sweep stops here, so
        that --resume trains it on; a sweep that went on would end its search without it."""
        raise StorageError(f"{self.uri}: trial {trial_id} failed on the storage ({error})")

    @_noted
    def drop_trial(self, trial_id: str) -> None:
        self.store.delete(f"{TRIALS}/{trial_id}")

    @_noted
    def drop_resume_state(self, experiment: str, trial_id: str) -> None:
        """A finished trial's last.pt in Ray's checkpoint (about 3x the model): only a running trial needs it."""
        for name in self.store.files(f"{experiment}/{trial_id}"):
            if name.endswith("/last.pt"):
                self.store.delete(name)


def fetch_settings(uri: str, endpoint: str | None, name: str | None, results: Path) -> str:
    """``--resume --storage URI --name NAME``: the sweep's settings from the bucket into ``results/NAME/``."""
    name = name or only_sweep(open_store(uri, endpoint))
    remote = SweepStorage.open(uri, endpoint, name)
    remote.store.check()
    if not remote.store.exists(SETTINGS_FILE):
        raise UserError(f"{remote.uri}: no sweep to resume there ({SETTINGS_FILE} is missing); check --storage "
                        f"and --name")
    remote.store.download_file(SETTINGS_FILE, results / name / SETTINGS_FILE)
    return name


def only_sweep(store: Store) -> str:
    """``--resume --storage URI`` without --name: the one sweep in ``URI`` (a folder holding sweep.json)."""
    store.check()
    found = [name for name in store.folders() if store.exists(f"{name}/{SETTINGS_FILE}")]
    if len(found) != 1:
        held = f"{len(found)} sweeps ({', '.join(found)})" if found else "no sweep"
        raise UserError(f"--resume --storage {store.uri}: it holds {held}; give --name")
    return found[0]


class TrialFiles:
    """The worker's side: the trial trains in a local folder of its own node, uploaded after every epoch."""

    def __init__(self, store: Store, trial_id: str):
        self.store, self.rel = store, f"{TRIALS}/{trial_id}"
        self.local = Path(tempfile.gettempdir()) / "lesion-sweep-trials" / _safe(store.root) / trial_id
        self._sent: dict[str, tuple[int, int]] = {}

    def prepare(self, resuming: bool) -> Path:
        """The local folder: the bucket's copy of the trial when it resumes (maybe on another node), else empty."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        if resuming:
            self.store.download_tree(self.rel, self.local)
        return self.local

    def push(self) -> int:
        """Upload the files that changed since the last push; bytes sent."""
        sent = 0
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            name = path.relative_to(self.local).as_posix()
            if excluded(name, WORKER_SKIPS) or atomic_temp(path.name):
                continue
            stat = path.stat()
            if self._sent.get(name) != (stat.st_mtime_ns, stat.st_size):
                sent += self.store.upload_file(path, f"{self.rel}/{name}")
                self._sent[name] = (stat.st_mtime_ns, stat.st_size)
        return sent

    def close(self) -> None:
        """After the trial's last upload: its local copy goes (the bucket has it)."""
        shutil.rmtree(self.local, ignore_errors=True)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
