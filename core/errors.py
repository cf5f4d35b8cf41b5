"""User-facing errors and the wrapper that turns them into one line and exit status 2.

Every command's ``main`` is run through :func:`run_cli`, so bad input (a corrupt image, a malformed
CSV, an unknown config key, a wrong path) ends as ``error: <message>`` on stderr with status 2 and
no traceback. Bugs are not :class:`UserError` and keep their traceback. A full disk that no writer
turned into a UserError itself (core/io/state_files.py does for every atomic write) is one line too.
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input the user can fix; its message names the file, row or key at fault."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a command's ``main``; a :class:`UserError` becomes one stderr line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        code = main(argv)
    except UserError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        _fail(f"{exc.filename or 'a write'}: no space left on the device; free some space, then run the command "
              f"again")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # errnos of a full disk (or quota)


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # always one line, whatever it held
    sys.exit(2)
