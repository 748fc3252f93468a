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


class _AllReduceSumWithGrad(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient too.

    Forward: ``S = sum_r X_r``. Every process's loss ``L_q`` depends on ``S``, so
    ``dX_r = sum_q dL_q / dS``: the same all-reduce, applied to the incoming gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``sum_r x_r`` over processes, differentiably (identity with one process)."""
    if world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


def global_batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of ``x (N, C, *)`` over every process's rows.

    ``n = sum_r N_r``, ``mu = (1/n) sum_r sum_i x_ri``,
    ``sigma^2 = (1/n) sum_r sum_i (x_ri - mu)^2`` (two passes, so no cancellation). Both sums
    are all-reduced differentiably, so gradients reach every process's rows as they would with
    one process on the global batch. Returns ``(mu, sigma^2, n)``.
    """
    dims = [0, *range(2, x.dim())]
    local_count = x.numel() // x.shape[1]
    count = local_count
    if world_size() > 1:
        counts = torch.tensor([local_count], dtype=torch.int64, device=x.device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        count = int(counts.item())
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = all_reduce_sum_with_grad(x.sum(dims)) / count
    centred = x - mean.view(shape)
    variance = all_reduce_sum_with_grad(centred.square().sum(dims)) / count
    return mean, variance, count
