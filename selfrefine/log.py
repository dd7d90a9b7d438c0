"""The library's messages: one `logging` logger, "selfrefine", writing plain lines to stdout.

Informational lines are INFO, "warning: ..." lines WARNING; `--quiet` shows warnings only (and turns progress bars
off), `--verbose` adds DEBUG. Errors do not come here: `selfrefine.errors` writes them to stderr. The handler looks
sys.stdout up when it writes, so a stream swapped in later (pytest's capsys, a redirect) gets the lines.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("selfrefine")


class _StdoutHandler(logging.Handler):
    """Each message as a line of whatever sys.stdout is at the time, flushed as print(..., flush=True) was."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


logger.addHandler(_StdoutHandler())
logger.setLevel(logging.INFO)
logger.propagate = False  # plain lines once, whatever the root logger of an embedding program does


def set_level(quiet: bool = False, verbose: bool = False) -> None:
    """The level the --quiet / --verbose flags ask for (INFO with neither); the configs refuse both together."""
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def quiet() -> bool:
    """Whether informational output is off (--quiet): progress bars follow it."""
    return not logger.isEnabledFor(logging.INFO)
