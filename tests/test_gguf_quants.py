"""The GGML dequantizers against `gguf.quants` (the reference implementation), one layout by hand, size checks."""

from __future__ import annotations

import numpy as np
import pytest

from selfrefine.gguf_quants import QUANT_TYPES, dequantize

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for types gguf cannot quantize (the K-quants), with finite float16 scales."""
    _, block_bytes, _ = QUANT_TYPES[name]
    b = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[name]:
        b[:, offset:offset + 2] = rng.uniform(-1, 1, (n_blocks, 1)).astype("<f2").view(np.uint8)
    return b


@pytest.mark.parametrize("name", list(QUANT_TYPES))
def test_dequantize_matches_gguf(name: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    try:
        raw = gguf.quants.quantize(x, Q[name])
    except NotImplementedError:
        raw = random_blocks(name, x.size // QUANT_TYPES[name][0], rng)
    expected = gguf.quants.dequantize(raw, Q[name]).reshape(-1)
    got = dequantize(raw, name, x.size)
    assert got.dtype == np.float32 and got.shape == (x.size,)
    np.testing.assert_array_equal(got, expected)
    if name in ("F32", "F16", "BF16", "Q8_0"):  # sanity: these are close to the input
        assert np.abs(got - x.reshape(-1)).max() <= 0.02 * np.abs(x).max()


def test_q4_0_layout_by_hand() -> None:
    """One block built byte by byte: d = 0.5, element j (j < 16) in the low nibble of byte j, j+16 in the high."""
    q = np.arange(32) % 16
    block = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8),
                            (q[:16] | (q[16:] << 4)).astype(np.uint8)])
    np.testing.assert_array_equal(dequantize(block, "Q4_0", 32), (q - 8) * 0.5)


def test_dequantize_rejects_wrong_size() -> None:
    with pytest.raises(ValueError, match="expected 68 bytes"):
        dequantize(np.zeros(67, np.uint8), "Q8_0", 64)
