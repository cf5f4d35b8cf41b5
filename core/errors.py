"""User-facing errors and the wrapper that turns them into one line and exit status 2.

Every command's ``main`` is run through :func:`run_cli`, so bad input (a corrupt image, a malformed
CSV, an unknown config key, a wrong path) ends as ``error: <message>`` on stderr with status 2 and
no traceback. Bugs are not :class:`UserError` and keep their traceback.
"""

from __future__ import annotations

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
        message = " ".join(str(exc).split())  # always one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
