"""Progress of a long step (decoding images, an epoch's steps, final training's epochs), suited to where it goes.

On a terminal (or in a notebook) it is tqdm's bar. Written to a file (``python -m core.train ... > log 2>&1``,
a cluster scheduler's batch job, a Ray worker's log, CI) a bar is carriage-return updates: a 2-epoch run's
log was one long line. There it is a plain logged line at most every ``LINE_EVERY_S`` seconds, and a last
one at the end when a step took that long; shorter steps add no line (the commands log each epoch anyway).
The same tqdm object either way (tqdm formats the line), so callers use update, set_postfix, n and close.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

LINE_EVERY_S = 30.0   # a job's log gets a line at most this often: readable, and still shows a hung step
LINE_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) after {elapsed}, {remaining} left, "
               "{rate_fmt}{postfix}")
OPEN_FORMAT = "{desc}: {n_fmt} {unit} after {elapsed}, {rate_fmt}{postfix}"   # no total known


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, leave: bool = True, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar on a terminal, else a :class:`LoggedProgress`; a disabled bar where ``enabled`` is false."""
    from tqdm.autonotebook import tqdm as notebook_tqdm  # tqdm's own class outside a notebook (imports IPython)

    stream = stream or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _is_terminal(stream) or notebook_tqdm is not tqdm:  # in a notebook: its widget, no carriage returns
        return notebook_tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                             file=stream)
    return LoggedProgress(iterable, total=total, desc=desc, unit=unit)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Nowhere:
    """tqdm's own output (the bar, its closing newline): the lines go through logging instead."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LoggedProgress(tqdm):
    """tqdm whose display is a logged line, at most one per ``every_s`` seconds, and one at the end if any came
    before it."""

    def __init__(self, *args: Any, every_s: float = LINE_EVERY_S, **kwargs: Any) -> None:
        # Set before tqdm's __init__, which displays the bar once. Times come from tqdm's clock (self._time).
        self._every_s, self._last_line, self._lines, self._last_n = every_s, None, 0, kwargs.get("initial", 0)
        super().__init__(*args, file=_Nowhere(), mininterval=every_s, bar_format=LINE_FORMAT, **kwargs)
        if self.total is None:
            self.bar_format = OPEN_FORMAT

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # Nothing new (the bar's first display, close's last) or too soon: no line. msg "": clearing the bar.
        if msg == "" or self.n == self._last_n:
            return True
        since = self._time() - (self.start_t if self._last_line is None else self._last_line)
        if since >= self._every_s:
            self._line()
        return True

    def close(self) -> None:
        if not self.disable and self._lines and self.n != self._last_n:
            self._line()  # how the step ended, after lines that said how it went
        super().close()

    def _line(self) -> None:
        log.info("%s", str(self))  # formatted now, not when a handler reads it
        self._last_line, self._lines, self._last_n = self._time(), self._lines + 1, self.n
