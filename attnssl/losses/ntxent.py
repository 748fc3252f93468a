"""NT-Xent with negatives from every process."""

from __future__ import annotations

import torch
import torch.nn as nn

from attnssl.functional import gather_with_grad, nt_xent
from attnssl.functional.distributed import rank


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent over ``n_views`` views; negatives gathered from all processes.

    ``loss = NTXentLoss(n_views=2, temperature=0.2)(z)`` with ``z`` of shape ``(n_views*B, D)``
    stacked view-major. Across processes the columns are the whole global batch (differentiable
    all-gather), each process scores its own anchors, and DDP's gradient average makes the
    update equal to one process on the global batch.
    """

    def __init__(self, n_views: int = 2, temperature: float = 0.2):
        super().__init__()
        if n_views < 2:
            raise ValueError(f"NT-Xent needs n_views >= 2, got {n_views}")
        self.n_views = n_views
        self.temperature = temperature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        columns = gather_with_grad(z)
        return nt_xent(z, columns, self.n_views, self.temperature,
                       column_offset=rank() * z.shape[0])
