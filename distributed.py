"""Distributed plumbing (torch.distributed): which slice a rank scores, reassembling the slices, one shared draw.

Under torchrun every rank scores its shard() of each evaluation set (contiguous whole batches of the
one-process order) and gather() returns every rank's part in rank order, which is the dataset order:
each rank then holds the numbers one process computes. shared_randint makes a random draw for the
global batch on rank 0 and broadcasts it, so a run's random choices do not depend on the world size.
Without an initialised process group each is the one-process identity. The gradient-carrying gather of
the contrastive loss is part of the loss (its global batch): mpm_nce.gather_features.
"""

import math

import torch
import torch.distributed as dist


def shard(n, batch_size):
    """This rank's slice of range(n) under torch.distributed (all of it in one process): contiguous
    whole batches of the single-process order, so every forward is one a single process makes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = math.ceil(n / batch_size)
    return range(min(n, batches * rank // world * batch_size), min(n, batches * (rank + 1) // world * batch_size))


def gather(part):
    """[every rank's part] in rank order, which for shard()'s slices is the dataset order ([part] in one process)."""
    if not dist.is_initialized():
        return [part]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def is_main_process():
    """Whether this process prints: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shared_randint(high, n):
    """torch.randint(high, (n,)) as rank 0 draws it, on every rank: rank 0 is seeded as one process is,
    so under DDP a draw for the global batch is the one a single process would make."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return torch.randint(high, (n,))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    picks = (torch.randint(high, (n,)) if dist.get_rank() == 0 else torch.empty(n, dtype=torch.long)).to(device)
    dist.broadcast(picks, src=0)  # on the device: NCCL broadcasts CUDA tensors only
    return picks.cpu()
