"""Multi-crop forward passes shared by the methods: one backbone pass per run of equal-sized
views, outputs stacked view-major (the official ``MultiCropWrapper`` of DINO, BAM and UDI)."""

from __future__ import annotations

import torch
import torch.nn as nn


def same_size_runs(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive views with equal spatial size."""
    runs, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        runs.append((start, end))
        start = end
    return runs


def multicrop_features(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """``backbone(x)`` for every view, one pass per run of equal-sized views, ``(V*B, D)``
    stacked view-major (the official ``MultiCropWrapper``)."""
    return torch.cat([backbone(torch.cat(views[a:b])) for a, b in same_size_runs(views)])


def multicrop_forward(backbone: nn.Module, head: nn.Module,
                      views: list[torch.Tensor]) -> torch.Tensor:
    """``head(backbone(x))`` for every view, ``(V*B, D_out)`` stacked view-major."""
    return head(multicrop_features(backbone, views))
