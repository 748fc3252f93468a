"""Frozen features of a backbone over a whole dataset split."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from attnssl.data.datasets import ImageDataset
from attnssl.data.views import normalise
from attnssl.nn.vit import last_block_tokens, pool_features
from attnssl.precision import resolve_precision


def autocast_context(precision: str, device_type: str = "cpu"):
    precision = resolve_precision(precision, device_type)
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(
    backbone: nn.Module, dataset: ImageDataset, kind: str = "cls", batch_size: int = 512,
    precision: str = "32", limit: int | None = None, blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, labels (N,))`` of the un-augmented images, backbone in eval
    mode: ``kind`` pooled from the normalised tokens of each of the last ``blocks`` blocks,
    concatenated (``D = blocks x`` the width of one pooling)."""
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
                per_block = last_block_tokens(
                    backbone, normalise(images, mean, std).to(device), blocks)
            pooled = [pool_features(t, kind, backbone.num_prefix_tokens) for t in per_block]
            features.append(torch.cat(pooled, dim=-1).float().cpu())
            labels.append(y)
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
