"""An exponential-moving-average teacher for the methods that use one (BAM, DINO, UDI)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from attnssl.functional.schedules import cosine


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (no gradients), to be updated by :func:`ema_update`.

    Stochastic depth is switched off in the copy (timm's ``DropPath`` reads ``drop_prob``):
    DINO and UDI build their teacher without it.
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m * theta_t + (1 - m) * theta_s`` for parameters; buffers are copied."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        t_buf.copy_(s_buf)


class EMATeacher(nn.ModuleDict):
    """The teacher of BAM, DINO and UDI: a frozen copy of the student's modules (a ``ModuleDict``,
    so its weights sit under ``teacher.<module>.`` in a method's state dict), updated after each
    optimiser step by ``theta_t <- m theta_t + (1 - m) theta_s``, with ``m`` on a cosine from
    ``base_momentum`` at step 0 to 1 at the last step (the official ``momentum_schedule`` of
    DINO and UDI, and BAM's).
    """

    def __init__(self, student: nn.ModuleDict, base_momentum: float):
        super().__init__(make_teacher(student))
        self.base_momentum = base_momentum
        self.momentum = base_momentum

    def set_step(self, step: int, total_steps: int) -> float:
        """Move the momentum to its value at ``step`` and return it."""
        self.momentum = cosine(step, total_steps, self.base_momentum, 1.0)
        return self.momentum

    def update_from(self, student: nn.ModuleDict, step: int, total_steps: int) -> None:
        ema_update(self, student, self.set_step(step, total_steps))
