"""The sampler's one-token decode forward over its slot cache, at either of two kinds of shapes.

Both read every position of the cache, each row's keys past its own length masked (exact zeros after the
softmax). `EagerStep` feeds the busy slots 0..hi-1: the least work, but a row count that changes every step.
`StaticStep` feeds every slot, from token-id and position tensors that never move, so on CUDA the forward is
captured once as a CUDA graph and each step is one replay: a small model's decode step is otherwise bound by
launching its few hundred kernels, not by the GPU. A free slot only writes its own position 0, which the next
prompt admitted to it overwrites, so both steps give the same tokens. On the CPU the static step runs without
capture (the same code, no graph), so the CPU tests check its logic.
"""

from __future__ import annotations

from typing import Callable

import torch

from .attention import SlotCache
from .model import Transformer

GRAPH_CHOICES = ("auto", "on", "off")
GRAPHS_HELP = ("the decode step: auto = captured as a CUDA graph on CUDA, eager elsewhere; on = the fixed-shape step "
               "anywhere (captured on CUDA only); off = eager (shapes follow the busy rows)")


def use_static_step(choice: str, device: torch.device) -> bool:
    """`--cuda-graphs`: auto = the static step on CUDA (captured), the eager one elsewhere; on = the static step
    anywhere (captured only on CUDA); off = the eager step."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def visible_keys(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, max_len) bool from the cache positions `keys` (max_len,): row b sees positions 0..index[b], its
    own keys and the one it writes now."""
    return (keys[None] <= index[:, None])[:, None, None]


class EagerStep:
    """The decode forward at the busy rows' own shapes."""

    def __init__(self, model: Transformer, cache: SlotCache, logits: torch.Tensor) -> None:
        self.model, self.cache, self.logits = model, cache, logits
        self.keys = torch.arange(cache.max_len, device=logits.device)

    def __call__(self, ids: list[int], at: list[int]) -> None:
        """Row s < len(ids): token ids[s] written at cache position at[s]; its next-token logits go to logits[s]."""
        device = self.logits.device
        index = torch.tensor(at, device=device)
        self.cache.index = index
        hidden = self.model.hidden_states(torch.tensor(ids, device=device)[:, None], index[:, None],
                                          visible_keys(self.keys, index), self.cache)
        self.model.logits_into(hidden[:, -1], self.logits[:len(ids)])


class StaticStep:
    """The decode forward over every slot and the whole cache, from fixed input tensors; captured as a CUDA
    graph when `capture`. Build it before any prompt is admitted: the warm-up runs write position 0 of every slot."""

    def __init__(self, model: Transformer, cache: SlotCache, logits: torch.Tensor, capture: bool) -> None:
        self.model, self.cache, self.logits = model, cache, logits
        slots, device = logits.shape[0], logits.device
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(slots, dtype=torch.long, device=device)
        self.keys = torch.arange(cache.max_len, device=device)
        self.graph = capture_graph(self.forward) if capture else None

    def forward(self) -> None:
        self.cache.index = self.index
        mask = visible_keys(self.keys, self.index)
        hidden = self.model.hidden_states(self.ids, self.index[:, None], mask, self.cache)
        self.model.logits_into(hidden[:, -1], self.logits)

    def __call__(self, ids: list[int], at: list[int]) -> None:
        """As `EagerStep`; the slots from len(ids) on are fed token 0 at position 0."""
        pad = [0] * (self.index.shape[0] - len(ids))
        self.ids.copy_(torch.tensor(ids + pad)[:, None])
        self.index.copy_(torch.tensor(at + pad))
        self.forward() if self.graph is None else self.graph.replay()


def capture_graph(fn: Callable[[], None], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """`fn` recorded as a CUDA graph, after a few runs on a side stream (PyTorch's recipe: lazy initialisation
    such as cuBLAS workspaces must happen before capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
