"""Which training pairs go into which batch, for one process or for each of several.

Every process draws the same permutation of the pairs from the same seed, cuts it into global batches of
`batch_size`, and takes its contiguous share of each: rank r of W gets items [r·b, (r+1)·b) of every global batch,
b = batch_size / W. Gathered in rank order, the shares are the global batch one process would draw, so training
with W processes sees the same batches (and the same hardest negatives) as training with one.

Length bucketing (`bucket_batches` > 0) sorts each run of that many consecutive global batches by caption length
before cutting it into batches, then shuffles the order of those batches: a batch then holds captions of similar
length (less padding in the text encoder and the cross attention), at the price of negatives that share a length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's share of each global batch of one epoch; the last partial global batch is dropped (the hinge
    loss of a batch needs negatives) unless it is the only one."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        bucket_batches: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {world_size} processes")
        self.lengths = torch.as_tensor(lengths, dtype=torch.int64)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.bucket_batches = bucket_batches

    def __len__(self) -> int:
        return max(1, len(self.lengths) // self.batch_size)

    def global_batches(self) -> list[torch.Tensor]:
        """The epoch's global batches, as index tensors."""
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.lengths), generator=generator)
        n_full = len(self) * self.batch_size if len(self.lengths) >= self.batch_size else len(self.lengths)
        order = order[:n_full]
        if self.bucket_batches:
            order = self._bucketed(order, generator)
        return list(order.split(self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size // self.world_size
        for batch in self.global_batches():
            if len(batch) < self.batch_size:  # the only, partial batch: split as evenly as it goes
                share = len(batch) // self.world_size
            yield batch[self.rank * share : (self.rank + 1) * share].tolist()

    def _bucketed(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        span = self.bucket_batches * self.batch_size
        batches: list[torch.Tensor] = []
        for start in range(0, len(order), span):
            group = order[start : start + span]
            group = group[torch.argsort(self.lengths[group], stable=True)]
            pieces = list(group.split(self.batch_size))
            batches += [pieces[i] for i in torch.randperm(len(pieces), generator=generator).tolist()]
        return torch.cat(batches)
