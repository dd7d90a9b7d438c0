"""Stage provenance: a pipeline stage is redone exactly when what it depends on changed.

Each stage's fingerprint is the digest of its name, its options, the code version and its inputs' fingerprints
(the upstream stages' fingerprints, data files by content, model directories by `fingerprint.model_digest`). It is
recorded in `OUT/stages/<name>.json` when the stage starts ("running") and again when it ends ("done"). On the next
run a stage is
  skipped   when its record is "done" with the same fingerprint,
  resumed   when its record is "running" with the same fingerprint (an interrupted training stage continues
            from its checkpoint, an interrupted sampling stage from its partial file),
  redone    otherwise: its old outputs are removed first, and since its fingerprint changed, so do the
            fingerprints of everything downstream, which is redone in turn.
Outputs with no record are not the pipeline's (a user's folder that happens to be named `sft`): they are never
removed, the run stops instead, `--force` or not.
A changed seed thus redoes the seeded stages and what depends on them, not the base model's evaluation.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .errors import fail
from .fingerprint import code_version, digest
from .files import read_json, write_json
from .log import logger


def _why(old: dict, new: dict, force: bool) -> str:
    """One phrase saying why a stage is redone."""
    if force:
        return "--force"
    for part in ("options", "inputs"):
        for k in sorted(set(old[part]) | set(new[part])):
            if old[part].get(k) != new[part].get(k):
                what = "input" if part == "inputs" else "option"
                return f"{what} {k} changed ({old[part].get(k)!r} -> {new[part].get(k)!r})"
    return "the code changed" if old["code_version"] != new["code_version"] else "its last run did not finish"


class Stages:
    """Runs the stages of one run folder, recording fingerprints and wall times."""

    def __init__(self, out: Path, force: bool = False, protected: tuple[Path, ...] = ()) -> None:
        self.out, self.force = out.resolve(), force
        self.protected = tuple(p.resolve() for p in protected)  # inputs that a clean-up must never touch
        self.fingerprints: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def _record_path(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def _remove(self, path: Path) -> None:
        """Delete a stage's old output, only inside the run folder and never an input of this run."""
        path = path.resolve()
        if not path.is_relative_to(self.out) or path == self.out:
            fail(f"refusing to remove {path}: it is outside the run folder {self.out}")
        if any(path == p or path in p.parents for p in self.protected):
            fail(f"refusing to remove {path}: it is an input of this run", path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def run(self, name: str, fn: Callable[[], object], *, outputs: list[Path], options: dict[str, Any],
            inputs: dict[str, str | None]) -> str:
        """Run (or skip, or resume) one stage; returns its fingerprint. `outputs` are the paths it owns."""
        new = {"stage": name, "options": options, "inputs": inputs, "code_version": code_version()}
        fp = digest(new)
        record_path = self._record_path(name)
        old = read_json(record_path) if record_path.exists() else None
        same = old is not None and old.get("fingerprint") == fp and not self.force
        self.fingerprints[name] = fp
        if same and old["status"] == "done":
            self.seconds[name] = old.get("seconds", 0.0)
            logger.info(f"[{name}] up to date ({fp}), skipped")
            return fp
        if same:
            logger.info(f"[{name}] resuming its interrupted run ({fp})")
        else:
            if old is None and any(p.exists() for p in outputs):  # not ours to delete, whatever --force says
                fail(f"[{name}] {next(p for p in outputs if p.exists())} exists but was not made by this pipeline "
                     f"(no {record_path}): move it away or choose another --out")
            if old is not None:
                logger.info(f"[{name}] {_why(old, new, self.force)}: redoing it and what depends on it")
            for p in outputs:
                self._remove(p)
            logger.info(f"[{name}] ...")
        write_json(record_path, {**new, "fingerprint": fp, "status": "running"})
        t0 = time.perf_counter()
        fn()
        gc.collect()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        write_json(record_path, {**new, "fingerprint": fp, "status": "done", "seconds": self.seconds[name]})
        logger.info(f"[{name}] {self.seconds[name]:.1f} s")
        return fp
