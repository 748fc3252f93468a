"""Collectives that keep gradients right across processes (identity with one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every process's gradient for each slice.

    Forward: ``Y = concat_r X_r``. Backward on process r: ``dX_r = sum_q (dL_q / dY)[slice r]``,
    so with DDP's gradient averaging the update equals one process on the global batch
    (a plain all-gather would drop the other processes' terms and be off by 1/W).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # autograd may hand us a buffer it still uses
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every process) over processes, differentiably."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
