"""Self-distillation maths shared by DINO and UDI (Caron et al. 2021; Su & Ji 2024).

Notation: ``K`` head outputs, teacher temperature ``T_t``, student temperature ``T_s``,
centre ``c``. For one teacher view ``g`` and one student view ``v``:

    p_g = softmax((t_g - c) / T_t)        q_v = log_softmax(s_v / T_s)
    CE(g, v) = mean over images of  - sum_k p_g[k] q_v[k]

and the multi-crop loss is the mean of ``CE(g, v)`` over every pair with ``v != g``
(github.com/facebookresearch/dino, ``DINOLoss``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from attnssl.functional.collapse import mean_row_entropy as entropy  # noqa: F401  (old name)
from attnssl.functional.schedules import teacher_temperature  # noqa: F401  (its old place)


def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """``softmax((t - c) / T_t)`` over the last dimension: the centred, sharpened target."""
    return F.softmax((teacher_logits - center) / temperature, dim=-1)


def pairwise_cross_entropy(student_log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over pairs ``(v, g)``, ``v != g``, of ``mean_i - sum_k targets[v, g, i, k] q[v, i, k]``.

    ``student_log_probs`` is ``(V, B, K)``; ``targets`` is ``(V, G, B, K)`` (an expanded view is
    fine: nothing is materialised), the target that student view ``v`` is asked to match for
    teacher view ``g``. Views ``0..G-1`` are the global views the teacher saw, so the pair
    ``v == g`` (a view predicting itself) is skipped.
    """
    n_views, n_teacher = targets.shape[:2]
    if student_log_probs.shape[0] != n_views:
        raise ValueError(f"student has {student_log_probs.shape[0]} views, targets {n_views}")
    total, pairs = student_log_probs.new_zeros(()), 0
    for g in range(n_teacher):
        for v in range(n_views):
            if v == g:
                continue
            total = total + torch.sum(-targets[v, g] * student_log_probs[v], dim=-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("no (student view, teacher view) pair with different views")
    return total / pairs


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      student_temp: float) -> torch.Tensor:
    """DINO's multi-crop loss: ``(V, B, K)`` student logits, ``(G, B, K)`` teacher targets."""
    log_probs = F.log_softmax(student_logits / student_temp, dim=-1)
    n_views = student_logits.shape[0]
    return pairwise_cross_entropy(log_probs, teacher_probs.unsqueeze(0).expand(n_views, -1, -1, -1))


def batch_center(values: torch.Tensor, weights: torch.Tensor | None = None,
                 distributed: bool = False) -> torch.Tensor:
    """Mean row of ``values (..., K)`` (weighted by ``weights (...)``) over every process's rows.

    Unweighted, each process's mean is averaged across processes: with the same row count on
    every process (DINO's and UDI's image-level centres) that is the global batch's mean, as
    DINO's ``update_center``. Weighted, the weighted sums and the total weight are all-reduced,
    so the mean is the global batch's weighted mean; the official UDI ``Centering`` averages the
    processes' own weighted means instead, which differs when their weights differ.
    Returns ``(1, K)``.
    """
    flat = values.reshape(-1, values.shape[-1])
    spread = distributed and dist.is_available() and dist.is_initialized()
    if weights is None:
        mean = flat.mean(0, keepdim=True)
        if spread:
            mean = mean.clone()
            dist.all_reduce(mean)
            mean = mean / dist.get_world_size()
        return mean
    w = weights.reshape(-1, 1).to(flat.dtype)
    total = torch.cat([(w * flat).sum(0), w.sum().reshape(1)])
    if spread:
        dist.all_reduce(total)
    return (total[:-1] / total[-1].clamp_min(1e-12)).unsqueeze(0)  # 0 if no weight


def ema_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """``c <- m c + (1 - m) mean``."""
    return center * momentum + batch_mean * (1 - momentum)
