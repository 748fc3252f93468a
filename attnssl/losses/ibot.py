"""iBOT's loss (Zhou et al. 2022, github.com/bytedance/ibot ``main_ibot.iBOTLoss``): DINO's
class-token distillation plus masked patch distillation with an online tokenizer.

Notation: ``G`` global views (the teacher sees them unmasked, the student masked), ``V`` views
in all, ``B`` images, ``N`` patches, ``m[g, b, n]`` the student's mask. With the teacher's
targets ``p = softmax((t - c) / T_t)`` (class tokens, centre ``c``) and
``p' = softmax((t' - c') / T'_t)`` (patch tokens, centre ``c'``), and the student's
``q = log_softmax(s / T_s)``:

    L_cls   = mean over pairs (g, v), v != g, of  mean_b  - sum_k p[g, b, k] q[v, b, k]
    L_patch = mean_g mean_b  sum_n m[g, b, n] CE[g, b, n] / max(1, sum_n m[g, b, n])
              with CE[g, b, n] = - sum_k p'[g, b, n, k] q'[g, b, n, k]   (same view only)
    L       = lambda_cls L_cls + lambda_patch L_patch

then ``c <- mu c + (1 - mu) mean_b t`` and ``c' <- mu' c' + (1 - mu') mean_b mean_n t'`` (batch
means all-reduced). An image without masked patches adds 0 to its view's mean, as in the
official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnssl.functional.dino import (
    batch_center,
    distillation_loss,
    ema_center,
    teacher_probabilities,
)
from attnssl.losses.dino import DINOLoss, diagnostics


def masked_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      masks: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``L_patch`` for ``(G, B, N)`` masks and the ``(M, K)`` student logits and teacher
    targets at the ``M`` masked patches (in the order of ``x[masks]``): the cross-entropy on
    each view's own masked patches, averaged per image over its masked patches, then over
    images and views. Unmasked patches weigh 0 in the official sum, so they are not computed."""
    log_probs = F.log_softmax(student_logits / student_temp, dim=-1)
    per_patch = log_probs.new_zeros(masks.shape)  # (G, B, N)
    per_patch[masks] = torch.sum(-teacher_probs * log_probs, dim=-1)
    per_image = per_patch.sum(-1) / masks.sum(-1).clamp(min=1).to(per_patch.dtype)
    return per_image.mean(-1).mean()


@dataclass(frozen=True)
class IBOTOutput:
    """The two terms and the class-token collapse diagnostics (as DINO's)."""

    loss: torch.Tensor
    cls: torch.Tensor
    patch: torch.Tensor
    teacher_entropy: torch.Tensor
    kl: torch.Tensor


class IBOTLoss(DINOLoss):
    """``IBOTLoss(...)(student_cls, student_patch, teacher_cls, teacher_patch, masks)``.

    ``student_cls`` is ``(V*B, K)`` stacked view-major (global views first), ``teacher_cls``
    ``(G*B, K)``; ``teacher_patch`` is ``(G*B, N, K')`` (every patch: its mean moves the
    centre), ``masks`` ``(G*B, N)``, and ``student_patch`` ``(M, K')``, the student's outputs
    at the ``M`` masked patches only (``x[masks]``), the only ones the loss reads.
    ``teacher_temp`` and ``teacher_patch_temp`` are the method's scheduled values for this step
    (the constructor's when omitted); the call returns an :class:`IBOTOutput`.
    Computed in float32 (float64 if given) with autocast off. The class-token half (its centre,
    temperatures and view checks) is :class:`DINOLoss`'s.
    """

    def __init__(self, out_dim: int, patch_out_dim: int, n_views: int, n_global_views: int,
                 student_temp: float = 0.1, teacher_temp: float = 0.04,
                 teacher_patch_temp: float = 0.04, center_momentum: float = 0.9,
                 center_momentum_patch: float = 0.9, lambda_cls: float = 1.0,
                 lambda_patch: float = 1.0):
        super().__init__(out_dim, n_views, n_global_views, student_temp, teacher_temp,
                         center_momentum)
        self.teacher_patch_temp = teacher_patch_temp
        self.center_momentum_patch = center_momentum_patch
        self.lambda_cls, self.lambda_patch = lambda_cls, lambda_patch
        self.register_buffer("center_patch", torch.zeros(1, 1, patch_out_dim))

    def forward(self, student_cls: torch.Tensor, student_patch: torch.Tensor,
                teacher_cls: torch.Tensor, teacher_patch: torch.Tensor,
                masks: torch.Tensor, teacher_temp: float | None = None,
                teacher_patch_temp: float | None = None) -> IBOTOutput:
        views, globals_ = self.n_views, self.n_global_views
        batch = teacher_cls.shape[0] // globals_
        masks = masks.bool()
        if student_cls.shape[0] != views * batch or masks.shape != teacher_patch.shape[:2] \
                or teacher_patch.shape[0] != globals_ * batch \
                or student_patch.shape != (int(masks.sum()), teacher_patch.shape[-1]):
            raise ValueError(
                f"iBOT expects student_cls ({views}*B, K), teacher_cls ({globals_}*B, K), "
                f"student_patch (masked patches, K'), teacher_patch ({globals_}*B, N, K') and "
                f"masks ({globals_}*B, N); got "
                f"{tuple(student_cls.shape)}, {tuple(teacher_cls.shape)}, "
                f"{tuple(student_patch.shape)}, {tuple(teacher_patch.shape)}, {tuple(masks.shape)}")
        dtype = torch.promote_types(student_cls.dtype, torch.float32)
        with torch.autocast(student_cls.device.type, enabled=False):
            teacher_cls, teacher_patch = teacher_cls.detach().to(dtype), teacher_patch.detach().to(dtype)
            probs = self.targets(teacher_cls, teacher_temp)
            cls_loss = distillation_loss(student_cls.to(dtype).view(views, batch, -1),
                                         probs.view(globals_, batch, -1), self.student_temp)
            patch_temp = self.teacher_patch_temp if teacher_patch_temp is None \
                else teacher_patch_temp
            patch_probs = teacher_probabilities(teacher_patch[masks], self.center_patch[0],
                                                patch_temp)
            patch_loss = masked_patch_loss(student_patch.to(dtype), patch_probs,
                                           masks.view(globals_, batch, -1), self.student_temp)
            loss = self.lambda_cls * cls_loss + self.lambda_patch * patch_loss
            self.update_centers(teacher_cls, teacher_patch)
        return IBOTOutput(loss, cls_loss.detach(), patch_loss.detach(),
                          *diagnostics(cls_loss, probs))

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        self.update_center(teacher_cls)
        patch_mean = batch_center(teacher_patch.mean(1), distributed=True).unsqueeze(0)
        self.center_patch.copy_(ema_center(self.center_patch, patch_mean,
                                           self.center_momentum_patch))
