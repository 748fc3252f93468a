"""Batch norm over the global batch on any device: SimCLR's "global BN" without CUDA.

SimCLR (Chen et al. 2020, section 2.3) aggregates the batch-norm mean and variance over all
devices, so the statistics, like the contrastive loss, cover the whole batch. torch's
``nn.SyncBatchNorm`` does this on CUDA only; this layer does it with plain collectives, so a
multi-process CPU (gloo) run normalises exactly as one process on the global batch would.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnssl.functional.distributed import global_batch_statistics, world_size


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics span every process.

    ``y = gamma (x - mu) / sqrt(sigma^2 + eps) + beta`` with ``mu``, ``sigma^2`` from
    :func:`~attnssl.functional.distributed.global_batch_statistics`; the running estimates
    move by ``momentum`` (or the cumulative average when it is ``None``) towards ``mu`` and
    the unbiased ``sigma^2 n / (n - 1)``. Statistics are computed in fp32 and the output keeps
    the input's dtype. With one process, or in evaluation, it is ``nn.BatchNorm1d``; the state
    dict is the same.

    With ``shift=False`` (and ``affine``) the layer learns the scale ``gamma`` only: ``beta``
    is absent (no parameter, no state-dict entry), as SimCLR's batch norm on the projector's
    output (``center=False`` in github.com/google-research/simclr). (torch's own
    ``BatchNorm1d(bias=False)`` does the same but is newer than the oldest torch this package
    supports; once that floor passes it, ``shift`` can hand over to it.)
    """

    def __init__(self, num_features: int, *args, shift: bool = True, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        if not shift:
            if not self.affine:
                raise ValueError("shift=False removes the learned shift of an affine batch "
                                 "norm; with affine=False there is none to remove")
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # statistics in fp32 or wider
        mean, variance, count = global_batch_statistics(x)
        if count <= 1:
            raise ValueError(f"batch norm needs more than 1 value per channel over all "
                             f"processes, got input of shape {tuple(x.shape)} and {count} in all")
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), variance.detach(), count)
        shape = [1, -1] + [1] * (x.dim() - 2)
        normalised = (x - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            normalised = normalised * self.weight.view(shape)
        if self.bias is not None:
            normalised = normalised + self.bias.view(shape)
        return normalised.to(dtype)

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, variance: torch.Tensor,
                                   count: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        unbiased = variance * count / max(count - 1, 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


__all__ = ["GlobalBatchNorm1d"]
