"""Methods by name: each fits backbone, heads and loss together for one training step.

A method is an ``nn.Module`` whose ``forward(views)`` returns a dict with ``loss`` and any
scalars worth logging. It may define ``before_step(step, steps_per_epoch, total_steps)`` (a
schedule of its own), ``after_step(step, total_steps)`` (an EMA teacher update, say) and
``evaluation_backbone`` (the backbone to evaluate and export; ``backbone`` otherwise).
"""

from __future__ import annotations

import torch.nn as nn

from attnssl.data.udi_views import UDIViews
from attnssl.data.views import MultiCropViews
from attnssl.methods.bam import BAM, evaluates_teacher
from attnssl.methods.dino import DINO
from attnssl.methods.mae import MAE
from attnssl.methods.simclr import SimCLR
from attnssl.methods.udi import UDI


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
        if config.optim.batch_size < 2:
            raise ValueError(f"simclr contrasts each image with the others of its batch: "
                             f"optim.batch_size must be at least 2, got {config.optim.batch_size}")
        return SimCLR(backbone, method_cfg, n_views=views.global_crops)
    if method_cfg.name == "bam":
        if views.global_crops + views.local_crops < 2:
            raise ValueError("bam needs at least 2 views: raise views.global_crops or "
                             "views.local_crops")
        return BAM(backbone, method_cfg, views.global_crops, views.local_crops)
    if method_cfg.name in ("dino", "udi"):
        if views.global_crops + views.local_crops < 2:
            raise ValueError(f"{method_cfg.name} needs at least 2 views: raise "
                             f"views.global_crops or views.local_crops")
        cls = DINO if method_cfg.name == "dino" else UDI
        return cls(backbone, method_cfg, views.global_crops, views.local_crops)
    if method_cfg.name == "mae":
        if views.global_crops != 1 or views.local_crops:
            raise ValueError(
                f"mae reconstructs one view per image; set views.global_crops=1 and "
                f"views.local_crops=0 (got {views.global_crops} and {views.local_crops})"
            )
        return MAE(backbone, method_cfg)
    raise ValueError(
        f"unknown method.name {method_cfg.name!r}; accepted: simclr, bam, dino, udi, mae")


def build_views(config, image_size: int, channels: int, mean, std, patch_size: int,
                seed: int) -> MultiCropViews:
    """The method's view maker: UDI's tracks its crops and samples patches; the rest share one."""
    if config.method.name == "udi":
        m = config.method
        return UDIViews(config.views, image_size, channels, mean, std, patch_size,
                        m.sampling_window_global, m.sampling_window_local, seed)
    return MultiCropViews(config.views, image_size, channels, mean, std, seed)


def evaluation_backbone_prefix(method_cfg) -> str:
    """Where the evaluated backbone's weights sit in a method's state dict."""
    if method_cfg.name in ("dino", "udi") or (
            method_cfg.name == "bam" and evaluates_teacher(method_cfg)):
        return "teacher.backbone."
    return "backbone."


def evaluation_backbone(method: nn.Module) -> nn.Module:
    return getattr(method, "evaluation_backbone", method.backbone)


__all__ = ["BAM", "DINO", "MAE", "UDI", "SimCLR", "build_method", "build_views", "evaluation_backbone",
           "evaluation_backbone_prefix"]
