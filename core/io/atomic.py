"""Atomic file output: write to a temporary file beside the target, then rename over it.

A reader (or a crash) never sees a half-written file under the final name: a write that fails (a full
disk: a one-line error, core/io/state_files.py) leaves the previous version and removes its temporary file.
A process killed mid-write leaves the temporary file; :func:`remove_stale_temps` clears those when the
next run claims the folder. (Reading JSON back, with one-line errors, is core/io/state_files.py's.)
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from core.io.state_files import writing

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed to ``path``.

    A full disk or an unwritable folder, here or in the caller's writing, is a one-line UserError naming
    ``path`` (core/io/state_files.py).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


_TEMP_SUFFIX = ".tmp"


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete the temporary files a killed process left while writing ``names`` (glob patterns, relative
    to ``folder``) atomically: each holds a partial copy, a checkpoint's is as large as the model."""
    for name in names:
        sub, _, base = name.rpartition("/")
        for tmp in Path(folder).glob(f"{sub}/.{base}.*{_TEMP_SUFFIX}" if sub else f".{base}.*{_TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def save_torch(obj: object, path: str | os.PathLike) -> None:
    import torch

    # Through a file object we close: a failed write (a full disk) frees its space at once, whatever still
    # holds torch's writer (the exception's traceback does).
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


FIGURE_DPI = 120   # every figure the project writes


def save_figure(fig: Figure, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (the format comes from ``path``'s suffix; ``FIGURE_DPI``, trimmed to its
    content, unless ``kwargs`` say otherwise), then close it: pyplot keeps every figure open until it is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **{"dpi": FIGURE_DPI, "bbox_inches": "tight",
                                                                          **kwargs})
    finally:
        plt.close(fig)
