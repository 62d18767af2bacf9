"""shard_indices: disjoint contiguous shards that cover the selection exactly once."""
from __future__ import annotations

import pytest

from flexvlm_ray.data import shard_indices


@pytest.mark.parametrize("total", [0, 1, 2, 3, 7, 10, 11, 64, 100, 101, 997])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7, 8, 16, 150])
def test_shards_cover_every_index_exactly_once(total, num_shards):
    shards = [shard_indices(total=total, shard=k, num_shards=num_shards) for k in range(num_shards)]
    flat = [i for shard in shards for i in shard]
    assert flat == list(range(total))  # disjoint, complete, in order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("total,shard,num_shards,expected", [
    (10, 0, 3, range(0, 4)),
    (10, 1, 3, range(4, 7)),
    (10, 2, 3, range(7, 10)),
    (2, 3, 4, range(2, 2)),
])
def test_shard_bounds_by_hand(total, shard, num_shards, expected):
    assert shard_indices(total=total, shard=shard, num_shards=num_shards) == expected


@pytest.mark.parametrize("shard,num_shards", [(0, 0), (-1, 2), (2, 2), (5, 3)])
def test_bad_shard_fails(shard, num_shards):
    with pytest.raises(ValueError):
        shard_indices(total=10, shard=shard, num_shards=num_shards)
