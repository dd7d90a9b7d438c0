"""How much of a batch one forward may take at once, so that its largest intermediate tensor stays small.

On a CPU, glibc serves an allocation above its largest dynamic mmap threshold (32 MiB) with a fresh mmap, whose
pages fault in on first touch every time; below it, freed heap blocks are reused. A prefill of 128 prompts at once
made 46 MB MLP activations in every layer: 2.1 million page faults and 40% of an evaluation's time on this
project's 2-core CPU. Work that would allocate such tensors runs in chunks whose largest tensor fits the budget.
On an accelerator the caching allocator reuses memory anyway, and the budget only bounds peak memory.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = {"cpu": 16 << 20}
DEFAULT_CHUNK_BYTES = 512 << 20


def chunk_rows(row_bytes: int, device: torch.device) -> int:
    """Rows per chunk when each row's largest tensor takes `row_bytes`: the device's budget (`CHUNK_BYTES`), at
    least one row."""
    return max(1, CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES) // row_bytes)
