"""Data-parallel plumbing: each rank scores its shard of a set, and the parts are gathered in order."""

import math

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
