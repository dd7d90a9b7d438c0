"""Progress bars: tqdm, on only where someone watches.

A bar is off on other torchrun ranks and under --no-progress (`enabled=False`), under --quiet (`log.quiet`), under
`TQDM_DISABLE=1`, and when stderr is not a terminal (a log file or a pipe would fill with carriage-return redraws;
metrics.jsonl and the printed lines carry the same numbers). tqdm reads TQDM_DISABLE only when `disable` is not
passed, so it is read here.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm

from . import log


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    off = not enabled or log.quiet() or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return tqdm(iterable, disable=True if off else None, **kwargs)  # None: off when not a terminal
