"""The optimiser: parameter groups, AdamW or SGD, and DINO's per-parameter clipping."""

from __future__ import annotations

import torch
import torch.nn as nn

from attnssl.nn.vit import takes_weight_decay


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only; none on biases, norms, class token and positions."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if takes_weight_decay(name, param) else no_decay).append(param)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


@torch.no_grad()
def clip_each_parameter(parameters, max_norm: float) -> None:
    """Scale each parameter's gradient to norm at most ``max_norm`` on its own,
    ``g <- g * min(1, max_norm / (||g|| + 1e-6))`` (DINO's and UDI's ``utils.clip_gradients``)."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas,
                                 weight_decay=optim.weight_decay)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)
    raise ValueError(f"unknown optim.optimizer {optim.optimizer!r}; accepted: adamw, sgd")
