"""Batch normalisation over the global batch when training runs as several processes.

With DDP each process sees only its share of the batch, so a plain BatchNorm would normalise with the statistics of
that share, and training would differ from one process on the whole batch (CVSE's instance attention and consensus
branches use BatchNorm). `GlobalBatchNorm` sums the count, sum and sum of squares of its input over the processes
(a differentiable all-reduce, so the gradient also flows through the shared statistics) and normalises with the
global mean and biased variance, as `nn.SyncBatchNorm` does on GPUs; unlike it, it also runs over gloo on CPUs.
The running statistics take the unbiased global variance, as `nn.BatchNorm1d` does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itm import distributed
from itm.distributed import Context


class GlobalBatchNorm(nn.BatchNorm1d):
    """`nn.BatchNorm1d` on [N, C] inputs whose training statistics cover every process's batch."""

    def __init__(self, source: nn.BatchNorm1d, context: Context) -> None:
        weight = source.weight if source.affine else source.running_mean
        super().__init__(
            source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats,
            device=None if weight is None else weight.device, dtype=None if weight is None else weight.dtype,
        )  # fmt: skip
        self.load_state_dict(source.state_dict())
        self.context = context

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self.context.distributed):
            return super().forward(input)
        if input.dim() != 2:
            raise ValueError(f"GlobalBatchNorm expects [N, C] inputs, got {tuple(input.shape)}")
        values = input.float()
        local = torch.cat([values.sum(0), (values * values).sum(0), values.new_tensor([len(values)])])
        total = distributed.all_reduce_with_grad(local, self.context)  # differentiable sum over the processes
        count = total[-1]
        mean = total[: self.num_features] / count
        variance = (total[self.num_features : 2 * self.num_features] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running(mean.detach(), variance.detach(), count.detach())
        normalised = (values - mean) * torch.rsqrt(variance + self.eps)
        if self.affine:
            normalised = normalised * self.weight + self.bias
        return normalised.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, variance: Tensor, count: Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * count / (count - 1).clamp_min(1)
        self.running_mean.mul_(1 - factor).add_(factor * mean)
        self.running_var.mul_(1 - factor).add_(factor * unbiased)


def with_global_batch_norm(module: nn.Module, context: Context) -> nn.Module:
    """`module` with every plain BatchNorm1d (a norm over the batch) replaced in place by a `GlobalBatchNorm`
    holding the same state; the state-dict keys stay the same. Unchanged with one process."""
    if not context.distributed:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:  # subclasses (e.g. a norm over a set every process holds) stay
            setattr(module, name, GlobalBatchNorm(child, context))
        else:
            with_global_batch_norm(child, context)
    return module
