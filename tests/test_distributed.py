"""distributed.py's shard of each rank: whole batches of the one-process order, together every index once, in
order (the end-to-end multi-process equality is tests/test_ddp.py's)."""

import pytest
import torch

import distributed


def ranks(monkeypatch, world):
    """Pretend to be each rank of a `world`-process group in turn."""
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(distributed.dist, "get_rank", lambda rank=rank: rank)
        yield rank


@pytest.mark.parametrize(
    ("n", "batch_size", "world"), [(10, 3, 2), (10, 3, 4), (7, 10, 3), (0, 4, 2), (100, 7, 8), (5, 1, 7)]
)
def test_shards_cover_the_set_once_in_order_in_whole_batches(monkeypatch, n, batch_size, world):
    shards = [distributed.shard(n, batch_size) for _ in ranks(monkeypatch, world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert all(s.start % batch_size == 0 for s in shards)  # each forward is one a single process makes
    batches = [len(range(s.start, s.stop, batch_size)) for s in shards]
    assert max(batches) - min(batches) <= 1
    for rank in ranks(monkeypatch, world):
        assert distributed.is_main_process() == (rank == 0)


def test_one_process_is_the_identity():
    assert distributed.shard(10, 3) == range(10)
    assert distributed.gather("part") == ["part"]
    assert distributed.is_main_process()
    torch.manual_seed(0)
    expected = torch.randint(5, (7,))
    torch.manual_seed(0)
    assert torch.equal(distributed.shared_randint(5, 7), expected)
