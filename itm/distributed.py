"""Running a stage as several processes (`torchrun`): who this process is, its share of the work, and collectives.

A stage that is asked for more than one process (`gpus` x `nodes` in its params section) re-launches itself under
`torchrun` (`itm.launch.relaunch_command`); each process then calls `start()`, which reads torchrun's environment
(`RANK`, `LOCAL_RANK`, `WORLD_SIZE`), joins the process group (NCCL on GPUs, gloo on CPUs) and picks its GPU.
Without torchrun, `start()` returns the single-process `Context`, and every helper here works unchanged in one
process.

Sharding follows detectron2's `InferenceSampler`: contiguous ranges whose sizes differ by at most one, never padded
with repeated items (a `DistributedSampler` pads by repeating indices, which biases recall@K; pytorch#25162).

`gather_with_grad` is the gather behind hardest negatives over the global batch: every rank gets the whole batch's
embeddings, and the gradient flowing into the copy of another rank's slice is sent back to that rank (the backward
pass sums the gathered gradient over ranks and keeps the local slice: open_clip `gather_features` with
`gather_with_grad`, `torch.distributed.nn.functional.all_gather`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from itm.errors import UserError
from itm.launch import LOCAL_RANK, RANK, WORLD_SIZE, launched_by_torchrun

TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits longer than this for the others fails


@dataclass(frozen=True)
class Context:
    """This process's place among the stage's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs, checkpoints and MLflow runs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE_PROCESS = Context()  # one process, on the CPU: the default of every function that takes a context


def start(device: torch.device) -> Context:
    """Join torchrun's process group when launched by it; else the single-process context on `device`.

    On CUDA each process takes the GPU of its local rank (NCCL); on the CPU the processes talk over gloo.
    """
    if not launched_by_torchrun():
        return Context(device=device)
    rank, world_size = int(os.environ[RANK]), int(os.environ[WORLD_SIZE])
    local_rank = int(os.environ.get(LOCAL_RANK, "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {rank} wants GPU {local_rank} but this node has {torch.cuda.device_count()}; lower gpus"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return Context(rank, world_size, local_rank, device)


def stop(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def processes(device: torch.device) -> Iterator[Context]:
    """`start()`, and leave the process group on the way out."""
    context = start(device)
    try:
        yield context
    finally:
        stop(context)


# --- sharding -------------------------------------------------------------------------------------------------------


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous share of items 0..n-1 of `rank`: sizes differ by at most one, nothing repeated or dropped."""
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


# --- collectives ----------------------------------------------------------------------------------------------------


def _transport(tensor: Tensor) -> Tensor:
    """`tensor` on the device the process group communicates on (NCCL: this GPU; gloo: the CPU), bool as uint8."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = tensor.to(device)
    return tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor


def all_gather_padded(tensor: Tensor, context: Context) -> list[Tensor]:
    """Every rank's `tensor` (same number of dims and dtype; any sizes), in rank order, on `tensor`'s device."""
    if not context.distributed:
        return [tensor]
    moved = _transport(tensor.contiguous())
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=moved.device)
    shapes = [torch.empty_like(shape) for _ in range(context.world_size)]
    dist.all_gather(shapes, shape)
    sizes = [tuple(int(s) for s in row.tolist()) for row in shapes]
    largest = tuple(max(dims) for dims in zip(*sizes, strict=True))
    padded = moved.new_zeros(largest)
    padded[tuple(slice(0, s) for s in tensor.shape)] = moved
    gathered = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(gathered, padded)
    return [
        part[tuple(slice(0, s) for s in size)].to(tensor.device, tensor.dtype)
        for part, size in zip(gathered, sizes, strict=True)
    ]


def all_gather_cat(tensor: Tensor, context: Context) -> Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order (dims beyond 0 zero-padded to the largest)."""
    parts = all_gather_padded(tensor, context)
    if len(parts) == 1:
        return parts[0]
    longest = [max(part.shape[d] for part in parts) for d in range(1, tensor.dim())]
    padded = []
    for part in parts:
        if list(part.shape[1:]) != longest:
            grown = part.new_zeros((part.shape[0], *longest))
            grown[tuple(slice(0, s) for s in part.shape)] = part
            part = grown
        padded.append(part)
    return torch.cat(padded)


def all_reduce_sum(tensor: Tensor, context: Context) -> Tensor:
    """The sum over ranks of `tensor` (a new tensor on `tensor`'s device; exact where at most one rank is non-zero)."""
    if not context.distributed:
        return tensor
    moved = _transport(tensor).clone()
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def broadcast_object(value: object, context: Context) -> object:
    """Rank 0's `value`, on every rank."""
    if not context.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (equal shapes); backward: the gathered gradient summed over ranks, local slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank, ctx.rows = rank, tensor.shape[0]  # type: ignore[attr-defined]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.rows  # type: ignore[attr-defined]
        return grad[start : start + ctx.rows], None, None  # type: ignore[attr-defined]


class _SumWithGrad(torch.autograd.Function):
    """all_reduce(SUM); backward: the gradient summed over ranks too (every rank's output is the same sum)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(tensor: Tensor, context: Context) -> Tensor:
    """The sum over ranks of `tensor`, differentiable (on the device the process group communicates on)."""
    return _SumWithGrad.apply(tensor) if context.distributed else tensor


def gather_with_grad(tensor: Tensor, context: Context) -> Tensor:
    """Every rank's `tensor` concatenated along dim 0 (dims beyond 0 zero-padded to the largest over ranks; dim 0
    must be the same on every rank), differentiable: the gradient of every copy of this rank's slice comes back to
    this rank.

    When each rank computes a loss `L` over the gathered tensors (the same `L` on every rank) and the gradients are
    then averaged over ranks (DDP), the parameters get exactly dL/dθ of one process over the whole batch.
    """
    if not context.distributed:
        return tensor
    if not tensor.is_floating_point():
        return all_gather_cat(tensor, context)  # masks and ids: nothing to differentiate
    shapes = [part.tolist() for part in all_gather_padded(torch.tensor(tensor.shape), context)]
    if any(shape[0] != shapes[0][0] for shape in shapes):
        raise ValueError(f"gather_with_grad needs the same dim 0 on every rank, got {[s[0] for s in shapes]}")
    largest = [max(shape[d] for shape in shapes) for d in range(tensor.dim())]
    padding = [amount for d in reversed(range(1, tensor.dim())) for amount in (0, largest[d] - tensor.shape[d])]
    if any(padding):
        tensor = F.pad(tensor, padding)  # differentiable; zeros, as a padded batch has
    return _GatherWithGrad.apply(tensor, context.rank, context.world_size)
