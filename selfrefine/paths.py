"""Outputs never replace inputs: every script checks its output paths against its input paths, and that each
output can be written, before it loads a model or writes anything (a mistake is found in a second, not after
an hour of sampling, and nothing is lost).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Union

from .errors import fail

PathLike = Union[str, os.PathLike]
Named = Union[Mapping[str, "PathLike | None"], Iterable[tuple[str, "PathLike | None"]]]


def _items(named: Named) -> list[tuple[str, Path]]:
    """(label, path) pairs, the unset ones dropped; a list keeps repeated labels (a task given twice)."""
    pairs = named.items() if isinstance(named, Mapping) else named
    return [(label, Path(p)) for label, p in pairs if p is not None and str(p) != ""]


def _same(a: Path, b: Path) -> bool:
    """The same file, through links (`resolve`) and hard links (`samefile`)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(inner: Path, outer: Path) -> bool:
    return inner.resolve() != outer.resolve() and inner.resolve().is_relative_to(outer.resolve())


def check_writable(path: PathLike, folder: bool = False) -> None:
    """Refuse now what would fail only at the end: a directory where a file goes (or a file where a folder
    goes), a parent that is a file, a directory we may not write into."""
    path = Path(path)
    if path.is_dir() and not folder:
        fail("is a directory; a file name is needed here", path)
    if path.exists() and folder and not path.is_dir():
        fail("exists and is not a directory; a folder is needed here", path)
    target = path.resolve()
    anchor = target if folder else target.parent
    while not anchor.exists() and not anchor.is_symlink():  # the first existing ancestor is where mkdir starts
        anchor = anchor.parent
    if not anchor.is_dir():
        fail(f"cannot be created: {anchor} is a file, not a directory", path)
    if not os.access(anchor, os.W_OK | os.X_OK):
        fail(f"cannot be written: directory {anchor} is not writable", path)


def check_outputs(inputs: Named, outputs: Named, folders: Iterable[str] = (), may_hold_inputs: bool = False) -> None:
    """Fail (one line naming the output) when an output is an input, lies inside an input folder, holds an input
    (a run folder over its own data; allowed with `may_hold_inputs`, for the pipeline, whose stages check their
    own paths), collides with another output, or cannot be written. `folders` names the outputs that are
    directories. Labels are the flags ("--out"), used in the messages."""
    ins, outs, folders = _items(inputs), _items(outputs), set(folders)
    for label, out in outs:
        for in_label, inp in ins:
            if _same(out, inp):
                fail(f"{label} is also the {in_label} input; writing it would destroy the input", out)
            if _inside(out, inp):
                fail(f"{label} lies inside the {in_label} input {inp}; choose a path outside it", out)
            if _inside(inp, out) and not may_hold_inputs:
                fail(f"{label} holds the {in_label} input {inp}, which the outputs could overwrite; "
                     "choose another folder", out)
    for i, (label, out) in enumerate(outs):
        for other_label, other in outs[:i]:
            if _same(out, other):
                what = (f"{label} is given twice" if label == other_label
                        else f"{label} and {other_label} are the same file")
                fail(f"{what}: the second would overwrite the first", out)
    for label, out in outs:
        check_writable(out, folder=label in folders)
