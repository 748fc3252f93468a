"""DINO's loss module: head outputs in, self-distillation loss out, centre kept as a buffer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from attnssl.functional.bam import sinkhorn
from attnssl.functional.collapse import mean_row_entropy
from attnssl.functional.dino import (
    batch_center,
    distillation_loss,
    ema_center,
    teacher_probabilities,
)


@dataclass(frozen=True)
class DistillationOutput:
    """A self-distillation loss and its collapse diagnostics (no gradient in the diagnostics).

    ``teacher_entropy`` is the mean entropy of the teacher's targets: near 0 when the targets
    collapse onto one dimension, near ``log K`` when they collapse onto the uniform.
    ``kl`` is ``KL(teacher || student)`` averaged over the pairs: near 0 when the student
    matches the teacher exactly, which happens in both collapses.
    """

    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    kl: torch.Tensor


def diagnostics(loss: torch.Tensor, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher entropy and KL(teacher || student) over the pairs.

    Every teacher view is paired with the same number of student views, so the pair mean of
    ``CE(g, v) - H(p_g)`` is ``loss - mean_g H(p_g)``.
    """
    h = mean_row_entropy(teacher_probs.detach())
    return h, loss.detach() - h


class DINOLoss(nn.Module):
    """DINO's loss (Caron et al. 2021, github.com/facebookresearch/dino ``DINOLoss``).

    ``DINOLoss(out_dim, n_views)(student, teacher, teacher_temp).loss``: ``student`` is ``(n_views * B, K)``
    head outputs stacked view-major, ``teacher`` is ``(n_global_views * B, K)`` for the global
    views (the first ``n_global_views`` of the student's). The loss is the mean over pairs
    ``v != g`` of ``CE(softmax((t_g - c)/T_t), softmax(s_v / T_s))``; then the centre moves,
    ``c <- m c + (1 - m) mean(t)`` with the batch mean all-reduced across processes.

    ``centering="sinkhorn"`` replaces the centre with DINOv2's Sinkhorn-Knopp teacher
    (Oquab et al. 2023, github.com/facebookresearch/dinov2 ``sinkhorn_knopp_teacher``): the
    targets are ``Q = diag(a) exp(t / T_t) diag(b)`` over the global batch of teacher outputs,
    scaled ``sinkhorn_iters`` times so that every output dimension gets the same total mass and
    every row sums to 1 (:func:`attnssl.functional.bam.sinkhorn`, all-reduced across
    processes). The centre is then neither used nor updated.

    ``teacher_temp`` is the method's scheduled value for this step (the constructor's when
    omitted); the call returns a :class:`DistillationOutput`. Computed in float32 (float64 if
    given) with autocast off (the official code runs it under fp16 autocast).
    """

    def __init__(self, out_dim: int, n_views: int, n_global_views: int = 2,
                 student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9, centering: str = "ema", sinkhorn_iters: int = 3):
        super().__init__()
        if not 1 <= n_global_views <= n_views or n_views < 2:
            raise ValueError(f"need 1 <= n_global_views <= n_views and n_views >= 2, got "
                             f"n_global_views={n_global_views}, n_views={n_views}")
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        self.n_views, self.n_global_views = n_views, n_global_views
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum = center_momentum
        self.centering, self.sinkhorn_iters = centering, sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                teacher_temp: float | None = None) -> DistillationOutput:
        out_dim = self.center.shape[-1]
        if student.shape[-1] != out_dim or student.shape[0] % self.n_views:
            raise ValueError(f"student outputs must be (n_views * B, {out_dim}) with "
                             f"n_views={self.n_views}, got {tuple(student.shape)}")
        batch = student.shape[0] // self.n_views
        if teacher.shape != (self.n_global_views * batch, out_dim):
            raise ValueError(f"teacher outputs must be ({self.n_global_views * batch}, {out_dim}), "
                             f"got {tuple(teacher.shape)}")
        dtype = torch.promote_types(student.dtype, torch.float32)
        with torch.autocast(student.device.type, enabled=False):
            teacher = teacher.detach().to(dtype)
            probs = self.targets(teacher, teacher_temp)
            loss = distillation_loss(student.to(dtype).view(self.n_views, batch, -1),
                                     probs.view(self.n_global_views, batch, -1),
                                     self.student_temp)
            if self.centering == "ema":
                self.update_center(teacher)
        return DistillationOutput(loss, *diagnostics(loss, probs))

    @torch.no_grad()
    def targets(self, teacher: torch.Tensor, teacher_temp: float | None = None) -> torch.Tensor:
        """The teacher's target distributions, one row per teacher output."""
        temp = self.teacher_temp if teacher_temp is None else teacher_temp
        if self.centering == "sinkhorn":
            return sinkhorn(teacher, temp, self.sinkhorn_iters, distributed=True)
        return teacher_probabilities(teacher, self.center, temp)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        mean = batch_center(teacher, distributed=True)
        self.center.copy_(ema_center(self.center, mean, self.center_momentum))
