"""Fingerprints: a digest follows the content (not key order, not the file's name), and a model directory's follows
its small files' content and its weight files' names, sizes and times."""

from __future__ import annotations

import os
from pathlib import Path

from selfrefine.fingerprint import digest, file_digest, model_digest, path_digest


def test_digest_is_canonical_json() -> None:
    a = {"lr": 1e-4, "data": Path("d.jsonl"), "sizes": (1, 2)}
    assert digest(a) == digest({"sizes": [1, 2], "data": "d.jsonl", "lr": 1e-4})  # key order, tuples, paths
    assert digest(a) != digest({**a, "lr": 2e-4}) and digest(a) != digest({**a, "sizes": (2, 1)})
    assert len(digest(a)) == 16 and int(digest(a), 16) >= 0


def test_file_digest_follows_the_content(tmp_path: Path) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_bytes(b"x" * (3 << 20))  # several read chunks
    two.write_bytes(b"x" * (3 << 20))
    assert file_digest(one) == file_digest(two) == path_digest(two)
    two.write_bytes(b"x" * ((3 << 20) - 1) + b"y")
    assert file_digest(one) != file_digest(two)
    assert path_digest(None) is None and path_digest(tmp_path / "nope") == "missing"


def test_model_digest_reads_small_files_and_stats_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    weights = model / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    stat = weights.stat()
    first = model_digest(model)
    assert path_digest(model) == first
    weights.write_bytes(b"\1" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same name, size and time: weights are not read
    assert model_digest(model) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # replaced whole: a new time
    assert model_digest(model) != first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (model / "config.json").write_text('{"hidden_size": 65}')  # a small file: read, same size, other content
    assert model_digest(model) != first
