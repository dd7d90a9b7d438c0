"""One error path for user mistakes: `error: FILE:LINE: what is wrong`, exit code 2, no traceback.

Exit codes of every script: 0 done, 2 bad input (a flag, a file, a model), 3 training diverged (a non-finite
loss, gradient or update: the step was not applied and the last good checkpoint is kept), 130 interrupted.

Library code raises `UserError`; the command-line entry points wrap `main` in `cli_main`, which turns
it into the one-line message. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake in the user's input, with where it is (file and line when known)."""

    exit_code = 2  # subclasses for other ends of a run (e.g. `trainer.TrainingDiverged`: 3)

    def __init__(self, message: str, file: str | os.PathLike | None = None, line: int | None = None) -> None:
        self.message, self.file, self.line = message, None if file is None else str(file), line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        return f"{where}{self.message}"


def fail(message: str, file: str | os.PathLike | None = None, line: int | None = None) -> NoReturn:
    raise UserError(message, file, line)


def cli_main(main: Callable[[], object]) -> None:
    """Run a command-line `main`; user errors become one line on stderr and their exit code (2; 3 for divergence)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
