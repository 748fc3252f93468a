"""UDI's loss module: image-level, multimodal and patch-level distillation with three centres."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.functional.dino import (
    batch_center,
    distillation_loss,
    ema_center,
    pairwise_cross_entropy,
    teacher_probabilities,
)
from attnssl.functional.udi import masked_cross_entropy, multimodal_logits
from attnssl.losses.dino import DistillationOutput, diagnostics

CLS, MULTIMODAL, PATCH = 0, 1, 2


@dataclass(frozen=True)
class UDIOutput(DistillationOutput):
    """The total loss, its three levels, and the diagnostics of the image-level targets."""

    cls: torch.Tensor
    cls_plus: torch.Tensor
    patch: torch.Tensor


class UDILoss(nn.Module):
    """UDI's loss (Su & Ji, ECCV 2024; official ``main_udi.UDILoss``, QingSuML/udi).

    Inputs are head outputs (logits), ``K`` wide, with V = 2 + L views, the two global ones
    first, ``S`` samples per global view and ``S_l`` per local view:

    * ``student_cls``, ``student_cls_plus`` ``(V, B, K)``: the student's two class tokens;
    * ``student_patch (2, B, S, K)``: the student's patch representations at each global
      view's own samples;
    * ``teacher_cls (2, B, K)``; ``teacher_patch (2, B, S, K)``, row g being the teacher's
      view g at the positions of the other view's samples; ``teacher_local_patch
      (L, 2, B, S_l, K)``, the teacher's view g at local view l's samples;
    * ``valid (2, B, S)`` and ``local_valid (L, 2, B, S_l)``: which samples fall in the other
      view (see :class:`attnssl.data.udi_views.UDISampling`).

    With ``p = softmax((t - c_j) / T_t)`` for centre ``j`` and ``q = log_softmax(s / T_s)``:

    * ``L_cls``: DINO's loss on ``cls`` against the teacher's ``cls`` (centre ``c_0``);
    * ``L_cls+``: ``cls+`` of view v against the multimodal target of teacher view g,
      ``g* = alpha mean_i g(zhat'_i) + (1 - alpha) g(z'_cls)`` over the valid positions of
      v's samples in g (centre ``c_1``); the mean over the same pairs as ``L_cls``;
    * ``L_patch``: each global view's patch representations against the teacher's at the
      matching positions of the other global view (centre ``c_2``), the mean over valid samples
      of both directions in the global batch;
    * ``L = (L_cls + L_cls+ + L_patch) / 3``.

    The centres move after the loss: ``c_0`` from the teacher's ``cls``, ``c_1`` from every
    multimodal target (global and local), ``c_2`` from every valid teacher patch output
    (global and local), each the mean over the global batch. With several processes the
    official code averages each process's own patch-level means (loss and ``c_2``); we count
    the valid samples over all processes instead, so W processes equal one on the global
    batch (the two agree whenever every process has as many valid samples).
    ``teacher_temp`` is the method's scheduled value for this step (the constructor's when
    omitted); the call returns a :class:`UDIOutput`. Computed in float32 (float64 if given)
    with autocast off.
    """

    def __init__(self, out_dim: int, alpha: float = 0.5, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, center_momentum: float = 0.9):
        super().__init__()
        self.alpha, self.student_temp, self.teacher_temp = alpha, student_temp, teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(3, 1, out_dim))

    def forward(self, student_cls: torch.Tensor, student_cls_plus: torch.Tensor,
                student_patch: torch.Tensor, teacher_cls: torch.Tensor,
                teacher_patch: torch.Tensor, teacher_local_patch: torch.Tensor,
                valid: torch.Tensor, local_valid: torch.Tensor,
                teacher_temp: float | None = None) -> UDIOutput:
        n_views = student_cls.shape[0]
        if teacher_local_patch.shape[0] != n_views - 2 or teacher_cls.shape[0] != 2:
            raise ValueError(f"expected 2 global and {n_views - 2} local views of teacher "
                             f"outputs, got {teacher_cls.shape[0]} and {teacher_local_patch.shape[0]}")
        dtype = torch.promote_types(student_cls.dtype, torch.float32)
        with torch.autocast(student_cls.device.type, enabled=False):
            t_cls, t_patch, t_local = (x.detach().to(dtype) for x in
                                       (teacher_cls, teacher_patch, teacher_local_patch))
            # teacher row g pairs with student view 1 - g: the other view's validity
            other_valid = valid.flip(0)
            mm_global = multimodal_logits(t_patch, other_valid, t_cls, self.alpha)  # (2, B, K)
            mm_local = multimodal_logits(t_local, local_valid, t_cls.unsqueeze(0), self.alpha)
            temp = self.teacher_temp if teacher_temp is None else teacher_temp
            center = self.center
            p_cls = teacher_probabilities(t_cls, center[CLS], temp)
            p_mm = teacher_probabilities(
                torch.cat([mm_global.unsqueeze(0).expand(2, -1, -1, -1), mm_local]),
                center[MULTIMODAL], temp)  # (V, 2, B, K): the target of view v for teacher g
            p_patch = teacher_probabilities(t_patch, center[PATCH], temp)
            loss_cls = distillation_loss(student_cls.to(dtype), p_cls, self.student_temp)
            loss_cls_plus = pairwise_cross_entropy(
                F.log_softmax(student_cls_plus.to(dtype) / self.student_temp, dim=-1), p_mm)
            loss_patch = masked_cross_entropy(p_patch, student_patch.to(dtype).flip(0), other_valid,
                                              self.student_temp, distributed=True)
            loss = (loss_cls + loss_cls_plus + loss_patch) / 3
            entropy, kl = diagnostics(loss_cls, p_cls)
            self.update_centers(t_cls, mm_global, mm_local, t_patch, t_local, other_valid,
                                local_valid)
        return UDIOutput(loss, entropy, kl, loss_cls.detach(), loss_cls_plus.detach(),
                         loss_patch.detach())

    @torch.no_grad()
    def update_centers(self, t_cls, mm_global, mm_local, t_patch, t_local, other_valid,
                       local_valid) -> None:
        dim = t_cls.shape[-1]
        means = [
            batch_center(t_cls, distributed=True),
            batch_center(torch.cat([mm_global.reshape(-1, dim), mm_local.reshape(-1, dim)]),
                         distributed=True),
            batch_center(torch.cat([t_patch.reshape(-1, dim), t_local.reshape(-1, dim)]),
                         torch.cat([other_valid.reshape(-1), local_valid.reshape(-1)]),
                         distributed=True),
        ]
        self.center.copy_(ema_center(self.center, torch.stack(means), self.center_momentum))
