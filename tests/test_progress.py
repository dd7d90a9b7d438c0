"""progress.py: a bar is on only for a terminal, and TQDM_DISABLE and enabled=False turn it off."""

from __future__ import annotations

import io

import pytest

from selfrefine.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env,enabled,tty,shown", [
    (None, True, True, True), (None, True, False, False), (None, False, True, False),
    ("1", True, True, False), ("True", True, True, False), ("0", True, True, True), ("false", True, True, True),
])
def test_progress_bar_shown_only_where_watched(monkeypatch, env, enabled, tty, shown):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    out = Terminal() if tty else io.StringIO()
    with progress_bar(total=3, desc="work", enabled=enabled, file=out) as bar:
        bar.update(3)
    assert ("work" in out.getvalue()) == shown
