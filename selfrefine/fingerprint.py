"""Fingerprints: short content hashes that say whether a stored result still matches what produced it.

A pipeline stage (or a cache such as the DPO reference log-probs) is keyed by the digest of its options, the code
version and its inputs' fingerprints; any change there gives another key, so a stale result is never reused.
Data files are hashed by content. Model directories are hashed by their small files' content and their weight
files' names, sizes and modification times: hashing 28 GB of 7B weights on every run would cost minutes, and a
weight file is only ever replaced whole (atomic writes), which changes its time.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def digest(obj: Any) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of `obj` (keys sorted; paths and tuples as JSON)."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:16]


def model_digest(model_dir: str | os.PathLike) -> str:
    """A model directory: small files by content, weight files by (name, size, mtime)."""
    entries = []
    for p in sorted(Path(model_dir).rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(model_dir).as_posix()
        if p.suffix in _WEIGHT_SUFFIXES:
            st = p.stat()
            entries.append((rel, st.st_size, st.st_mtime_ns))
        else:
            entries.append((rel, file_digest(p)))
    return digest(entries)


def path_digest(path: str | os.PathLike | None) -> str | None:
    """A file by content, a directory as a model directory, None for no path (an input that is not there is
    its own fingerprint: "missing")."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return model_digest(p)
    return file_digest(p) if p.is_file() else "missing"


@lru_cache(maxsize=1)
def code_version() -> str:
    """The digest of the library's own source: a result made by other code is another result."""
    root = Path(__file__).resolve().parent
    return digest([(p.relative_to(root).as_posix(), file_digest(p)) for p in sorted(root.rglob("*.py"))])
