"""The collectives and sharding of itm.distributed, in two CPU processes over gloo."""

from __future__ import annotations

import pytest
import torch

from itm import distributed
from itm.distributed import Context, shard_range
from tests.processes import run_processes


def test_shards_cover_every_item_once_without_padding() -> None:
    for n in (0, 1, 5, 7, 100):
        for world in (1, 2, 3, 8):
            shards = [shard_range(n, rank, world) for rank in range(world)]
            assert [i for shard in shards for i in shard] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _gathers(context: Context) -> dict:
    rank = context.rank
    ragged = torch.full((rank + 1, 2 + rank), float(rank))
    weights = torch.arange(6.0).reshape(3, 2).requires_grad_()
    local = weights * (rank + 1)  # [3, 2], this rank's slice
    gathered = distributed.gather_with_grad(local, context)  # [6, 2]
    # a loss over the whole gathered batch, the same on every rank
    (gathered**2).sum().backward()
    return {
        "padded": distributed.all_gather_padded(ragged, context),
        "cat": distributed.all_gather_cat(ragged, context),
        "sum": distributed.all_reduce_sum(torch.tensor([rank + 1.0]), context),
        "object": distributed.broadcast_object({"rank": rank}, context),
        "grad": weights.grad,
        "mask": distributed.all_gather_cat(torch.tensor([[True, rank == 0]]), context),
    }


@pytest.mark.slow
def test_collectives_in_two_processes() -> None:
    results = run_processes(_gathers)
    for result in results:
        assert [tuple(t.shape) for t in result["padded"]] == [(1, 2), (2, 3)]
        assert result["cat"].shape == (3, 3)
        assert result["cat"][0, 2] == 0 and result["cat"][1:, 2].eq(1).all()  # padded with zeros
        assert float(result["sum"]) == 3.0
        assert result["object"] == {"rank": 0}
        assert result["mask"].dtype == torch.bool and result["mask"].tolist() == [[True, True], [True, False]]
    weights = torch.arange(6.0).reshape(3, 2)
    for rank, result in enumerate(results):
        # d/dw of the loss summed over the two ranks' identical copies: 2 x 2 (r+1)^2 w
        torch.testing.assert_close(result["grad"], 2 * 2 * (rank + 1) ** 2 * weights)
