"""One env-driven distributed path: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python`
is the world-size-1 case. gloo on CPU, nccl on CUDA. Only rank 0 writes files."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment, pick the device and start the process group (if any).

    `device` is "auto" (CUDA when available), "cpu" or "cuda"."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, local_rank, world_size, dev)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank, so every rank builds identical initial weights. Data order differs
    per rank through the DistributedSampler, not through this seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reduce_dict(values: dict, average: bool = True) -> dict:
    """Mean (or sum) over ranks of a dict of scalars (floats or 0-d tensors); plain floats out."""
    keys = sorted(values)
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if get_world_size() > 1:
        backend = dist.get_backend()
        if backend == "nccl":
            vec = vec.cuda()
        dist.all_reduce(vec)
        if average:
            vec /= get_world_size()
    return {k: v.item() for k, v in zip(keys, vec.cpu())}


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list:
    """Every rank's `obj` in rank order on rank `dst`, an empty list on the other ranks (a
    one-element list without a process group): for results too large to hold on every rank."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out if out is not None else []


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(model: torch.nn.Module, env: DistEnv, sync_bn: bool = False) -> torch.nn.Module:
    """DistributedDataParallel when world size > 1 (SyncBN conversion first when asked); the model
    itself otherwise. `find_unused_parameters` stays off: frozen parameters have requires_grad=False."""
    model.to(env.device)
    if not env.distributed:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
