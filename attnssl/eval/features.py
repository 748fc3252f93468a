"""Frozen features of a backbone over a whole dataset split, and the batch loop every
frozen pass over a split shares (evaluation, fine-tuning's accuracy, the analysis)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode within the block, its own mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def split_batches(dataset: ImageDataset, limit: int | None = None, batch_size: int = 512
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(indices, images uint8, labels)`` of the first ``limit`` images (all by default), in
    order, ``batch_size`` at a time."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, count, batch_size):
        indices = torch.arange(start, min(start + batch_size, count))
        yield (indices, *dataset.get_batch(indices))


CENTRE_CROP = 0.875  # DINO's and MAE's evaluation: Resize(256) then CenterCrop(224)


def evaluation_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """The images the backbone is evaluated on: as stored, or, when ``size`` differs from the
    stored side, resized so that a centre crop of ``size`` keeps 87.5 % of the side (the
    official evaluations' ``Resize(size / 0.875)`` and ``CenterCrop(size)``, antialiased)."""
    if size is None or size == images.shape[-1]:
        return images
    from torchvision.transforms.functional import center_crop, resize

    resized = resize(images, [round(size / CENTRE_CROP)] * 2, antialias=True)
    return center_crop(resized, [size, size])


@torch.no_grad()
def extract_features(
    backbone: nn.Module, dataset: ImageDataset, kind: str = "cls", batch_size: int = 512,
    precision: str = "32", limit: int | None = None, blocks: int = 1, size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32, labels (N,))`` of the un-augmented images, backbone in eval
    mode: ``kind`` pooled from the normalised tokens of each of the last ``blocks`` blocks,
    concatenated (``D = blocks x`` the width of one pooling). ``size``: the side the backbone
    was trained at (see :func:`evaluation_images`)."""
    mean, std = dataset.mean_std
    device = next(backbone.parameters()).device
    features, labels = [], []
    with evaluation_mode(backbone):
        for _, images, y in split_batches(dataset, limit, batch_size):
            with autocast_context(precision, device.type):
                per_block = last_block_tokens(
                    backbone, normalise(evaluation_images(images, size), mean, std).to(device),
                    blocks)
            pooled = [pool_features(t, kind, backbone.num_prefix_tokens) for t in per_block]
            features.append(torch.cat(pooled, dim=-1).float().cpu())
            labels.append(y)
    return torch.cat(features), torch.cat(labels)
