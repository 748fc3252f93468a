"""Collapse diagnostics: of a batch of embeddings, and of rows of probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_row_entropy(prob: torch.Tensor, log_prob: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of ``H(p) = -sum_j p_j log p_j`` in nats (``0 log 0 = 0``); ``log_prob``,
    when the caller has it, avoids taking the log again. ``log K`` is the uniform row."""
    if log_prob is None:
        log_prob = prob.clamp_min(torch.finfo(prob.dtype).tiny).log()
    return -(prob * log_prob).nan_to_num().sum(dim=-1).mean()


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of L2-normalised ``z`` (0 when all rows agree).

    For embeddings spread uniformly on the sphere in D dimensions this is about ``1/sqrt(D)``.
    """
    return F.normalize(z.float(), dim=-1).std(dim=0).mean()


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` with ``p = sigma / sum(sigma)`` over the singular values of L2-normalised ``z``.

    Roy & Vetterli (2007): 1 for a rank-one batch, ``min(n, D)`` for equal singular values.
    """
    sigma = torch.linalg.svdvals(F.normalize(z.float(), dim=-1))
    p = sigma / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.exp(-(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum())
