"""Fixtures for the recipe tests: a tiny model directory and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model_dir


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def demos(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "demos.jsonl", [
        {"prompt": f"What is {i} plus {i + 3}?", "completion": f"{i} + {i + 3} = {2 * i + 3}. The answer is {2 * i + 3}."}
        for i in range(8)])


@pytest.fixture()
def pairs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i} times 2?", "chosen": f"{i} * 2 = {2 * i}. The answer is {2 * i}.",
         "rejected": f"The answer is {i + 7}."} for i in range(6)])
