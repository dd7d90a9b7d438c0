"""Dequantizers for GGML tensor types, in plain vectorized numpy: raw bytes in, float32 out.

Each function takes the tensor's bytes as `(n_blocks, block_bytes)` uint8 rows and returns
`(n_blocks, block_elems)` float32, following the block layouts of ggml-quants.c (little endian):

    Q8_0  (32 elems, 34 B):  f16 d, int8 q[32]                        x = d * q
    Q4_0  (32 elems, 18 B):  f16 d, u8 qs[16]  lo nibbles 0-15, hi 16-31  x = d * (q - 8)
    Q4_1  (32 elems, 20 B):  f16 d, f16 m, u8 qs[16]                 x = d * q + m
    Q5_0  (32 elems, 22 B):  f16 d, u32 qh, u8 qs[16]  bit j of qh is bit 4 of elem j   x = d * (q - 16)
    Q5_1  (32 elems, 24 B):  f16 d, f16 m, u32 qh, u8 qs[16]         x = d * q + m
    Q4_K (256 elems, 144 B): f16 d, f16 dmin, 12 B of 6-bit (scale, min) x 8, u8 qs[128]
    Q5_K (256 elems, 176 B): as Q4_K plus u8 qh[32] (bit i of qh[l] is bit 4 of sub-block i, elem l)
    Q6_K (256 elems, 210 B): u8 ql[128], u8 qh[64], int8 scales[16], f16 d   x = d * scale * (q - 32)
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _f16(cols: np.ndarray) -> np.ndarray:
    """Two byte columns holding a little-endian float16 -> (n, 1) float32."""
    return np.ascontiguousarray(cols).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) bytes -> (..., 2k) values: the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) of its bits, bit 0 first."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def dequant_f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4").astype(np.float32)


def dequant_f16(b: np.ndarray) -> np.ndarray:
    return _f16(b)


def dequant_bf16(b: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32."""
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(np.float32)


def dequant_q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def dequant_q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).astype(np.float32) - 8)


def dequant_q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b[:, 2:4])


def dequant_q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.astype(np.float32) - 16)


def dequant_q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.astype(np.float32) + _f16(b[:, 2:4])


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4 in ggml-quants.c).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 take their
    low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7.
    """
    lo_s, lo_m, packed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo_s & 63, (packed & 0x0F) | ((lo_s >> 6) << 4)], axis=1)
    mins = np.concatenate([lo_m & 63, (packed >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_quant_4bit(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): each 32-byte chunk c holds sub-block 2c (low nibbles) and 2c+1 (high)."""
    chunks = qs.reshape(-1, 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _k_dequant(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = d * scale * q - dmin * min, per 32-element sub-block (Q4_K and Q5_K)."""
    scales, mins = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(len(b), 256)


def dequant_q4_k(b: np.ndarray) -> np.ndarray:
    return _k_dequant(b, _k_quant_4bit(b[:, 16:144]).astype(np.float32))


def dequant_q5_k(b: np.ndarray) -> np.ndarray:
    qh = b[:, 16:48]
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _k_dequant(b, (_k_quant_4bit(b[:, 48:176]) | (high << 4)).astype(np.float32))


def dequant_q6_k(b: np.ndarray) -> np.ndarray:
    """Two halves of 128 elems; in each, ql[0:32], ql[32:64] give elems 0-31 / 32-63 (low nibbles)
    and 64-95 / 96-127 (high nibbles); qh[l] gives their top 2 bits at shifts 0, 2, 4, 6.
    Every 16 consecutive elements share one int8 scale."""
    n = len(b)
    ql, qh = b[:, :128].reshape(n, 2, 2, 32), b[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, half, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.float32).reshape(n, 16, 16) - 32
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    return (_f16(b[:, 208:210])[:, :, None] * scales[:, :, None] * q).reshape(n, 256)


# name -> (elements per block, bytes per block, dequantizer)
QUANT_TYPES: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (1, 4, dequant_f32),
    "F16": (1, 2, dequant_f16),
    "BF16": (1, 2, dequant_bf16),
    "Q8_0": (32, 34, dequant_q8_0),
    "Q4_0": (32, 18, dequant_q4_0),
    "Q4_1": (32, 20, dequant_q4_1),
    "Q5_0": (32, 22, dequant_q5_0),
    "Q5_1": (32, 24, dequant_q5_1),
    "Q4_K": (256, 144, dequant_q4_k),
    "Q5_K": (256, 176, dequant_q5_k),
    "Q6_K": (256, 210, dequant_q6_k),
}


def dequantize(raw: np.ndarray, type_name: str, n_elements: int) -> np.ndarray:
    """The flat float32 values of a tensor stored as `type_name` (a GGML type name such as "Q4_1")."""
    block_elems, block_bytes, fn = QUANT_TYPES[type_name]
    if n_elements % block_elems:
        raise ValueError(f"{n_elements} elements is not a whole number of {type_name} blocks of {block_elems}")
    n_blocks = n_elements // block_elems
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if raw.size != n_blocks * block_bytes:
        raise ValueError(f"{type_name}: expected {n_blocks * block_bytes} bytes, got {raw.size}")
    return fn(raw.reshape(n_blocks, block_bytes)).reshape(n_elements)
