"""Frozen features of a backbone over a whole dataset split."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from attnssl.data.datasets import ImageDataset
from attnssl.data.views import normalise
from attnssl.nn.vit import pool_features


def autocast_context(precision: str, device_type: str = "cpu"):
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(
    backbone: nn.Module, dataset: ImageDataset, kind: str = "cls", batch_size: int = 512,
    precision: str = "32", limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, labels (N,))`` of the un-augmented images, backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    mean, std = dataset.mean_std
    device = next(backbone.parameters()).device
    count = len(dataset) if limit is None else min(limit, len(dataset))
    features, labels = [], []
    try:
        for start in range(0, count, batch_size):
            indices = torch.arange(start, min(start + batch_size, count))
            images, y = dataset.get_batch(indices)
            with autocast_context(precision, device.type):
                tokens = backbone.forward_features(normalise(images, mean, std).to(device))
            features.append(pool_features(tokens, kind, backbone.num_prefix_tokens).float().cpu())
            labels.append(y)
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
