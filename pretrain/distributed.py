"""Process-group helpers that fall back to a single process when no group exists.

Works under the `deepspeed` launcher, `torchrun` and plain `python` (world size 1): both launchers
set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain process gets defaults.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only: the one place rank-0 gating of console output lives."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initializes the default process group through DeepSpeed: nccl on GPU, gloo on CPU. A plain
    `python` process becomes a world of one."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(get_local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    unlink_shm_buffers()


def shm_buffer_path(rank: int) -> Path:
    """/dev/shm segment of DeepSpeed's CPU all-reduce op (csrc/cpu/comm/shm.cpp) for `rank`."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def unlink_shm_buffers() -> None:
    """DeepSpeed's CPU all-reduce op maps one /dev/shm segment per rank (66 MB) and never removes
    it. Its set-up returns only once a rank has mapped every peer's segment, so after a barrier
    the names are no longer needed: each rank unlinks its own, and the memory goes back to the
    system when the last process mapping it exits, however it exits (kill -9 included)."""
    barrier()
    shm_buffer_path(get_rank()).unlink(missing_ok=True)


def destroy_distributed(barrier: bool = True) -> None:
    if is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
