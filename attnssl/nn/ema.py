"""An exponential-moving-average teacher for the methods that use one (BAM, DINO, UDI)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


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
