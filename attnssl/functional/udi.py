"""UDI's maths beyond DINO's (Su & Ji 2024; official ``main_udi.UDILoss``, QingSuML/udi)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, weights: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``sum_i w_i x_i / (sum_i w_i + eps)`` over the sample axis: ``(..., S, K)`` -> ``(..., K)``.

    The ``eps`` is the official code's; a row with no valid sample gives 0.
    """
    w = weights.to(values.dtype).unsqueeze(-1)
    return (w * values).sum(-2) / (w.sum(-2) + eps)


def multimodal_logits(patch_logits: torch.Tensor, valid: torch.Tensor, cls_logits: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """The target of ``cls+``, blended in logit space before centring:

        g* = alpha * mean_{valid i} g(zhat'_i) + (1 - alpha) * g(z'_cls)

    ``patch_logits (..., S, K)``, ``valid (..., S)``, ``cls_logits (..., K)``.
    """
    return alpha * masked_mean(patch_logits, valid) + (1 - alpha) * cls_logits


def masked_cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor,
                         mask: torch.Tensor, student_temp: float,
                         distributed: bool = False) -> torch.Tensor:
    """``sum_i mask_i CE(p_i, softmax(s_i / T_s)) / sum_i mask_i`` over all leading axes.

    0 when nothing is valid, where the official code divides by the zero count and its loss
    (and every gradient) turns NaN for that step; we keep the step finite on purpose.

    ``distributed``: the count is the global batch's (all-reduced) and the local sum is scaled
    by the number of processes ``W``, so that DDP's mean of the processes' gradients is the
    gradient of the global batch's mean. The official code takes each process's own mean, which
    differs from one process on the global batch whenever the processes' valid counts do."""
    ce = torch.sum(-teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1)
    mask = mask.to(ce.dtype)
    count, world = mask.sum(), 1
    if distributed and dist.is_available() and dist.is_initialized():
        count, world = count.detach().clone(), dist.get_world_size()
        dist.all_reduce(count)
    return world * (ce * mask).sum() / count.clamp_min(1.0)
