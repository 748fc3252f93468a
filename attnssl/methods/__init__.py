"""Methods by name: each fits backbone, heads and loss together for one training step.

A method is an ``nn.Module`` whose ``forward(views)`` returns a dict with ``loss`` and any
scalars worth logging, and which may define ``after_step(step, total_steps)`` for work after the
optimiser step (an EMA teacher update, say).
"""

from __future__ import annotations

import torch.nn as nn

from attnssl.methods.simclr import SimCLR


def build_method(config, backbone: nn.Module) -> nn.Module:
    method_cfg, views = config.method, config.views
    if method_cfg.name == "simclr":
        if views.local_crops:
            raise ValueError(
                f"simclr uses global views only; set views.local_crops=0 "
                f"(got {views.local_crops})"
            )
        if views.global_crops < 2:
            raise ValueError(f"simclr needs views.global_crops >= 2, got {views.global_crops}")
        return SimCLR(backbone, method_cfg, n_views=views.global_crops)
    raise ValueError(f"unknown method.name {method_cfg.name!r}; accepted: simclr")


__all__ = ["SimCLR", "build_method"]
