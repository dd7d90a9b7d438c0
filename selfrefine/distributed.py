"""torchrun support: one process per device, data-parallel training (DDP, or FSDP2 for full fine-tuning)
and sharded sampling. Every function is a no-op (or the identity) in a plain single process, so the code
that calls them reads the same either way and a single process behaves exactly as without them.

Launch: `torchrun --nproc_per_node=N train_sft.py ...`. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK;
the process group uses NCCL on CUDA and gloo on CPU. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import os
import sys
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """Started by torchrun with more than one process (a one-process torchrun is a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (idempotent); silence stdout on ranks other than 0."""
    if not launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(teardown)
    if rank() != 0:  # N copies of every progress line and summary help no one; errors still go to stderr
        sys.stdout = open(os.devnull, "w")


def teardown() -> None:
    """Leave the process group (at exit). Collect garbage first: FSDP keeps the last asynchronous
    collectives in reference cycles, and gloo aborts if their tensors die with the interpreter."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (pickled; for results and small state, not tensors in bulk)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (counts and weighted metric sums)."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def shard(items: list[T] | range) -> list[T]:
    """This rank's share, round-robin: rank r takes items r, r + world, ... (the union is `items`, in order)."""
    return list(items)[rank()::world()]


# ---- training ---------------------------------------------------------------------------------------------

def wrap(model: torch.nn.Module, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """The module to run forward/backward through: DDP (gradients all-reduced in backward), or FSDP2
    (`fully_shard` per decoder layer, then the root: parameters, gradients and AdamW state sharded)."""
    if world() == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    # Buffers (RoPE tables) are the same constants everywhere: broadcasting them each forward is waste. torch 2.13
    # calls the switch `forward_sync_buffers` and deprecates the older `broadcast_buffers` (all torch 2.11 has).
    ddp = torch.nn.parallel.DistributedDataParallel
    switch = next(k for k in ("forward_sync_buffers", "broadcast_buffers") if k in inspect.signature(ddp).parameters)
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{switch: False})


def is_sharded(model: torch.nn.Module) -> bool:
    if world() == 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(engine: torch.nn.Module, skip: bool) -> Iterator[None]:
    """With `skip`, backward only accumulates local gradients (no communication) until the last micro-batch."""
    if not skip or world() == 1:
        yield
    elif isinstance(engine, torch.nn.parallel.DistributedDataParallel):
        with engine.no_sync():
            yield
    else:  # FSDP2
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank must call it), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable parameters on the CPU, under their plain names (collective under FSDP)."""
    return {n: full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Under FSDP the shards gathered into one full, name-keyed state (collective); else the usual state_dict."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_trainable(model: torch.nn.Module, trainable: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`: every rank loads the full tensors and keeps its shard."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in trainable.items():
                params[n].copy_(t)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
                        optim_state: dict) -> None:
    """Inverse of `trainable_state` + `optimizer_state`: every rank loads the full file and keeps its shard."""
    load_trainable(model, trainable)
    if not is_sharded(model):
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True, strict=False))


def gathered_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """A plain model with the full weights on rank 0 (None elsewhere): what gets saved after FSDP training.
    Without FSDP every rank holds the full model already, and only rank 0 gets it."""
    if not is_sharded(model):
        return model if is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    from .model import Transformer

    plain = Transformer(model.config)
    plain.load_state_dict(state)
    return plain
