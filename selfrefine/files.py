"""Files that survive crashes: atomic writes (temp file in the same folder, fsync, rename) and
JSON/JSONL readers whose errors name the file and line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import fail
from .log import logger


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, else delete it.

    A reader (or a crash at any moment) sees the old complete file or the new complete one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would make outputs unreadable to others
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# What `atomic_write` and `checkpoint.save_model` name their temporaries: ".NAME." + mkstemp's 8 characters + ".tmp".
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(folder: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
    """Remove the temporary files and model directories that a killed write of ours left in `folder` (of the
    outputs `names` only, if given), and say so; called when a run starts, when no write of its own is under way.
    Anything not named as our temporaries are is left alone."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        m = _TEMP.fullmatch(entry.name)
        if m and (names is None or m["name"] in names) and not entry.is_symlink():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry)
    if removed:
        logger.info(f"{folder}: removed {len(removed)} temporary file(s) left by an interrupted write: "
                    + ", ".join(p.name for p in removed))
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename durable (the directory entry itself is data)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one line and flush it to disk (metrics logs: a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_torn_tail(path: str | os.PathLike) -> int:
    """Cut an append-only log back to its last complete line; returns the bytes dropped.

    `append_jsonl` writes whole lines ending in a newline, so a tail without one is what a kill or a full disk
    left mid-write: it is dropped rather than read as bad JSON, or glued to the next append."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; a missing or non-UTF-8 file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        fail("file not found", path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fail(f"not a UTF-8 text file (byte {e.start})", path)


def parse_json(text: str, path: str | os.PathLike, lineno: int | None = None) -> Any:
    """json.loads whose failures are one-line errors naming the file and line: bad JSON, nesting too deep for
    Python's parser, and lone surrogate escapes ("\\ud800", which no UTF-8 output could ever write back)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"invalid JSON: {e.msg} (column {e.colno})", path, e.lineno if lineno is None else lineno)
    except RecursionError:
        fail("JSON nested too deeply", path, lineno)
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        fail("a string holds a lone surrogate escape (\\udXXX), which is not text", path, lineno)
    except RecursionError:
        fail("JSON nested too deeply", path, lineno)
    return obj


def read_json(path: str | os.PathLike) -> Any:
    return parse_json(read_text(path), path)


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = (), allow_empty: bool = False) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; bad JSON or a missing field names file and line."""
    path = Path(path)
    if not path.is_file():
        fail("file not found", path)
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = parse_json(line, path, lineno)
                if not isinstance(rec, dict):
                    fail("expected a JSON object on each line", path, lineno)
                for key in required:
                    if key not in rec:
                        fail(f"missing field {key!r}", path, lineno)
                out.append((lineno, rec))
        except UnicodeDecodeError:
            fail("not a UTF-8 text file", path)
    if not out and not allow_empty:
        fail("no records (empty file)", path)
    return out
