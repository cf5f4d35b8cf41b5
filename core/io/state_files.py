"""State files read back, output folders checked, and full disks: every fault as one line that says what to do.

Not a command. A command reads back what an earlier run left (``last.pt``, ``best.pt``, ``model.pt``,
``run.json``, a sweep's ``sweep.json``, ``best.json``, ``splits.csv``, ``optuna.db``, Ray's experiment
state); a copy cut short, a full disk elsewhere or a disk error can leave any of them damaged. Reading
them through here ends the command with ``error: <file>: <what is wrong>; <what to do>`` and exit status
2 (core/errors.py) instead of a library's traceback:

- :func:`load_torch`: a PyTorch file; :func:`read_json_state`: a JSON object (absent: None);
  :func:`read_json_object`: a JSON object that must be there, also the one reader of the JSON files a
  user hands a command (config.json, best.json, a sweep's settings);
  (a sweep's optuna.db and Ray state are checked by sweep/state_check.py, with :func:`file_size` and
  :func:`short_reason` from here);
- :func:`reading`: any other reader, e.g. ``with reading(path, advice, KeyError): use(state["model"])``.

:func:`writing` (used by every atomic write, core/io/atomic.py) turns a full disk (``ENOSPC``, or torch's
zip writer failing), a read-only file system or a denied write into one line naming the file and the
free space. :func:`check_output_dir` checks an output folder before any work starts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from core.errors import DISK_FULL, UserError

if TYPE_CHECKING:
    import torch

_NOT_WRITABLE = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "not permitted", errno.ENOTDIR: "part of its path is a file, not a folder",
                 errno.EEXIST: "a file has its folder's name", errno.EISDIR: "a folder of that name is in the way"}


def load_torch(path: str | os.PathLike, advice: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a damaged or unreadable file is a UserError with ``advice``."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; {advice}") from None
    except Exception as exc:  # zip errors (a file cut short), unpickling errors (garbage), EOFError (empty)
        raise UserError(f"{path}: damaged, not a readable PyTorch file ({file_size(path)}, {_torch_reason(exc)}); "
                        f"{advice}") from None


def _torch_reason(exc: Exception) -> str:
    """torch's reason in a few words: its unpickler's complaint is buried in a paragraph about weights_only."""
    detail = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
    if detail is None:
        return short_reason(exc)
    return f"{type(exc).__name__}: {short_reason(detail.group(1)) or 'not a pickle torch can read'}"


def read_json_state(path: str | os.PathLike, advice: str) -> dict[str, Any] | None:
    """A JSON object a run wrote, or None where the file is absent; damaged: UserError with ``advice``."""
    path = Path(path)
    if not path.exists():
        return None
    with reading(path, advice):
        return read_json_object(path, "no such file")


def read_json_object(path: str | os.PathLike, missing: str) -> dict[str, Any]:
    """A JSON object from ``path``; absent (``"<path>: <missing>"``), unreadable or not an object: UserError."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


@contextmanager
def reading(path: str | os.PathLike, advice: str, *damage: type[BaseException]) -> Iterator[None]:
    """Around code that reads ``path``: a UserError naming it gets ``advice``; ``damage`` exceptions become one."""
    try:
        yield
    except UserError as exc:
        text = str(exc)
        if text.startswith(str(path)) and advice not in text:
            raise UserError(f"{text}; {advice}") from None
        raise
    except damage as exc:
        raise UserError(f"{path}: damaged or not what this command expects ({short_reason(exc)}); {advice}") from None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Around a write of ``path``: a full disk, a read-only file system or a denied write is a UserError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        problem = write_problem(path, exc)
        if problem is None:
            raise
        raise problem from None


def write_problem(path: str | os.PathLike | None, exc: BaseException) -> UserError | None:
    """The one-line error for a failed write of ``path``, or None when ``exc`` is not about the disk."""
    path = Path(path or getattr(exc, "filename", None) or ".")
    reason = _disk_reason(exc)
    if reason is None:
        return None
    if getattr(exc, "errno", None) in _NOT_WRITABLE:
        return UserError(f"{path}: cannot write it ({reason}); write elsewhere (another --out or --results)")
    return UserError(f"{path}: cannot write it, {reason} ({free_space(path)} free in {_existing(path)}; the file "
                     f"needs more); free some space, then run the command again (what was saved before is kept)")


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Before any work: ``path`` (given as ``option``) must be a folder that can be created and written."""
    path = Path(path).expanduser()
    for place in (path, *path.parents):
        if place.is_dir():
            break
        if place.exists() or place.is_symlink():
            where = f"{option} {path}" if place == path else f"{option} {path}: {place}"
            raise UserError(f"{where} is a file, not a folder; give a folder")
    try:
        with tempfile.TemporaryFile(dir=place, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = _disk_reason(exc) or exc.strerror or type(exc).__name__
        raise UserError(f"{option} {path}: cannot write in {place} ({reason}); give another folder") from None
    return path


def _disk_reason(exc: BaseException) -> str | None:
    """Why a write failed, where the disk or the file system is the reason; else None."""
    code = getattr(exc, "errno", None)
    if code in DISK_FULL:
        return "the disk is full"
    if code in _NOT_WRITABLE:
        return _NOT_WRITABLE[code]
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _TORCH_WRITE_FAILURES):
        # torch's zip writer reports a failed write without its errno: the free space tells the rest.
        detail = " ".join(str(exc).split("] ", 1)[-1].split()).strip(" .")[:80]
        return f"PyTorch's writer failed ({detail}): the disk is probably full"
    return None


_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed")


def free_space(path: str | os.PathLike) -> str:
    try:
        return _bytes(shutil.disk_usage(_existing(Path(path))).free)
    except OSError:
        return "unknown space"


def _existing(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists (where the free space is measured)."""
    for place in (path, *path.parents):
        if place.is_dir():
            return place
    return Path(".")


def _bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def file_size(path: Path) -> str:
    """The size of a file in words, for an error message ("size unknown" where it cannot be read)."""
    try:
        return _bytes(path.stat().st_size)
    except OSError:
        return "size unknown"


def short_reason(exc: BaseException | str, limit: int = 120) -> str:
    """The first sentence of an error, on one line: library messages go on for paragraphs."""
    text = " ".join(str(exc).split())
    first = text.split(". ")[0].rstrip(".")
    reason = f"{type(exc).__name__}: {first}" if isinstance(exc, BaseException) and first else (
        type(exc).__name__ if isinstance(exc, BaseException) else first)
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."
