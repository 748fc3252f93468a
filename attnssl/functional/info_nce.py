"""NT-Xent / InfoNCE (Chen et al. 2020, SimCLR), for V >= 2 views of each image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(
    local: torch.Tensor, columns: torch.Tensor, n_views: int, temperature: float,
    column_offset: int = 0,
) -> torch.Tensor:
    """NT-Xent of the ``local`` anchors against all ``columns``.

    ``local`` is ``(V*B, D)`` stacked view-major (row ``v*B + i`` is view v of image i);
    ``columns`` is ``(W*V*B, D)``: every process's ``local`` concatenated, this process's block
    starting at row ``column_offset``. With ``z`` L2-normalised and ``s_ak = z_a . z_k / tau``,

        L = mean over anchors a and positives p of  - log( exp(s_ap) / sum_{k != a} exp(s_ak) ),

    the positives of anchor (v, i) being the other views (v', i), v' != v, of the same image.
    With V = 2 this is SimCLR's loss averaged over the 2B anchors.
    """
    if local.shape[0] % n_views:
        raise ValueError(f"{local.shape[0]} rows are not a multiple of n_views={n_views}")
    batch = local.shape[0] // n_views
    dtype = torch.promote_types(local.dtype, torch.float32)  # low-precision inputs in fp32
    anchors = F.normalize(local.to(dtype), dim=-1)
    keys = F.normalize(columns.to(dtype), dim=-1)
    logits = anchors @ keys.T / temperature  # (V*B, W*V*B)
    rows = torch.arange(anchors.shape[0], device=local.device)
    self_cols = rows + column_offset
    logits = logits.masked_fill(
        F.one_hot(self_cols, logits.shape[1]).bool(), float("-inf")
    )
    log_prob = logits.log_softmax(dim=-1)
    view, image = rows // batch, rows % batch
    losses = []
    for shift in range(1, n_views):
        positive_cols = ((view + shift) % n_views) * batch + image + column_offset
        losses.append(-log_prob[rows, positive_cols])
    return torch.stack(losses).mean()
