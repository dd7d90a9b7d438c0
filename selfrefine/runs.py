"""Run folders: `OUT/run.json` records the config, git commit, library versions and seed, and guards
against mixing two runs in one folder or resuming with a different config."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from . import distributed
from .errors import fail
from .fingerprint import path_digest
from .files import read_json, remove_stale_temps, write_json

RUN_FILE = "run.json"
# Flags that say how to run, not what to compute: changing them on resume is fine.
NEUTRAL_KEYS = {"resume", "allow_config_change", "save_every", "report_to", "quiet", "verbose"}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in ("torch", "tokenizers", "safetensors", "numpy", "tqdm"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


def describe(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a run folder records of how it was made: the config, the command, the code and library versions."""
    return {"config": config, **extra, "git_commit": git_commit(), "versions": versions(), "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def start_run(out_dir: str | Path, config: dict[str, Any], resume: bool, allow_config_change: bool = False,
              inputs: dict[str, str | os.PathLike | None] | None = None) -> tuple[Path, Callable[[], None]]:
    """Create or re-open OUT; refuse a folder holding something else, a resume with another config, and a resume
    whose input files (`inputs`: flag -> path) changed since the run started: recorded by content hash, since an
    edit in place keeps the path and would mix old and new data (`--allow-config-change` does not override it).

    Returns (OUT, commit). A new run's run.json is written here; a resumed run's updated run.json only when
    `commit()` is called, once the checkpoint has loaded (the trainer does it), so a resume that fails later
    leaves the old record as it was.

    Under torchrun rank 0 checks and writes while the others wait (they would see its run.json as "another run")."""
    out = Path(out_dir)
    if not distributed.is_main():
        distributed.barrier()
        return out, lambda: None
    paths = {k: v for k, v in (inputs or {}).items() if v is not None}
    digests = {k: path_digest(v) for k, v in paths.items()}
    run_file = out / RUN_FILE
    prior = read_json(run_file) if run_file.exists() else None
    if prior is not None:
        if resume:
            recorded = prior.get("inputs", {})
            for k, d in digests.items():
                if k in recorded and recorded[k] != d:
                    fail(f"--{k.replace('_', '-')} changed since this run started (its content hash differs); "
                         "resuming would mix old and new data: start a new --out", paths[k])
        else:
            fail("this folder holds another run: pass --resume to continue it, or choose a new --out", out)
        old = prior.get("config", {})
        changed = sorted(k for k in set(old) | set(config)
                         if k not in NEUTRAL_KEYS and old.get(k) != config.get(k))
        if changed and not allow_config_change:
            k = changed[0]
            fail(f"--resume with a different config ({k}: {old.get(k)!r} -> {config.get(k)!r}); "
                 "pass --allow-config-change to accept", run_file)
    elif out.exists() and any(out.iterdir()):
        fail("output folder is not empty and holds no run.json; choose a new --out", out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in [out, *(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())]:  # adapter/, merged/
        remove_stale_temps(folder)
    record = {**describe(config, inputs=digests), "seed": config.get("seed")}
    if prior is None:
        write_json(run_file, record)
    else:
        record = {**prior, "config": config, "inputs": {**prior.get("inputs", {}), **digests},
                  "resumed": prior.get("resumed", []) + [record["started"]]}
    distributed.barrier()
    return out, (lambda: None) if prior is None else (lambda: write_json(run_file, record))
