"""Full fine-tuning and low-shot evaluation.

Fine-tuning trains the whole backbone and a linear classifier with the recipe of MAE's
``main_finetune.py`` (facebookresearch/mae) scaled to small data: AdamW, layer-wise learning
rate decay, label smoothing, warm-up then cosine, random-resized-crop and flip augmentation.
Low-shot evaluation draws a fixed, class-balanced, seeded share of the labelled train split
(1 % and 10 % in the UDI paper) and runs the linear probe or fine-tuning on it alone.
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.config import ViewsSection
from attnssl.data.datasets import ImageDataset
from attnssl.data.views import MultiCropViews, normalise
from attnssl.eval.features import evaluation_mode, split_batches
from attnssl.functional.schedules import warmup_cosine
from attnssl.nn.udi import vit_tokens
from attnssl.nn.vit import pool_features, takes_weight_decay


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed, class-balanced share of a labelled split.

    Each class ``c`` with ``n_c`` images contributes ``max(1, round(fraction * n_c))`` of
    them, drawn without replacement by a generator seeded with ``seed``; the same call always
    returns the same indices (sorted).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"low-shot fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == c).flatten()
        take = max(1, round(fraction * members.numel()))
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit``: embeddings 0, block ``i`` ``i + 1``, the rest ``depth + 1``."""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def layer_decay_groups(backbone: nn.Module, head: nn.Module, weight_decay: float,
                       layer_decay: float) -> list[dict]:
    """Parameter groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no weight
    decay on biases, norms, class tokens and positions (MAE's ``param_groups_lrd``)."""
    depth = len(backbone.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    named = [(n, p) for n, p in backbone.named_parameters()]
    named += [(f"head.{n}", p) for n, p in head.named_parameters()]
    for name, param in named:
        layer = layer_id(name, depth)
        decay = takes_weight_decay(name, param)
        group = groups.setdefault((layer, decay), {
            "params": [], "lr_scale": layer_decay ** (depth + 1 - layer),
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
    return list(groups.values())


class Classifier(nn.Module):
    """Backbone, pooled features and a linear head.

    ``mean`` is MAE's ``global_pool``: the mean patch token of the last block, before the
    backbone's final norm, through a new LayerNorm (``fc_norm``). Other kinds pool the
    normalised tokens (``forward_features``), as MAE's class-token path does.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, features: str):
        super().__init__()
        self.backbone, self.features = backbone, features
        width = pool_features(torch.zeros(1, backbone.num_prefix_tokens + 1, backbone.embed_dim),
                              features, backbone.num_prefix_tokens).shape[-1]
        linear = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(linear.weight, std=2e-5)  # MAE's head initialisation
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.LayerNorm(width, eps=1e-6) if features == "mean"
                                  else nn.Identity(), linear)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prenorm, normed = vit_tokens(self.backbone, images)
        tokens = prenorm if self.features == "mean" else normed
        return self.head(pool_features(tokens, self.features, self.backbone.num_prefix_tokens))


def augmentation(dataset: ImageDataset, seed: int) -> MultiCropViews:
    """One random-resized crop (scale 0.4-1) and flip per image; no colour changes."""
    views = ViewsSection(global_crops=1, global_scale=(0.4, 1.0), color_jitter_prob=0.0,
                         grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))
    mean, std = dataset.mean_std
    return MultiCropViews(views, dataset.image_size, dataset.channels, mean, std, seed)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ImageDataset, batch_size: int = 512,
             limit: int | None = None) -> float:
    """Top-1 (%) on the first ``limit`` images of ``dataset`` (all by default)."""
    mean, std = dataset.mean_std
    device = next(model.parameters()).device
    correct = count = 0
    with evaluation_mode(model):
        for _, images, labels in split_batches(dataset, limit, batch_size):
            logits = model(normalise(images, mean, std).to(device))
            correct += (logits.argmax(1).cpu() == labels).sum().item()
            count += len(labels)
    return 100.0 * correct / count


def finetune_accuracy(backbone: nn.Module, train: ImageDataset, test: ImageDataset, ft,
                      features: str, indices: torch.Tensor | None = None, seed: int = 0,
                      test_limit: int | None = None) -> float:
    """Top-1 (%) on ``test`` after fine-tuning a copy of ``backbone`` on ``train[indices]``.

    ``ft`` holds ``epochs, lr, batch_size, layer_decay, label_smoothing, weight_decay,
    warmup_epochs`` (config ``eval.finetune``). Every parameter is trained, frozen positions
    (MAE's sine-cosine table) included, as MAE's fine-tuning does. Runs in fp32 on the
    backbone's device. Left out of MAE's recipe: stochastic depth (0.1), RandAugment, random
    erasing, mixup and cutmix.
    """
    pool = torch.arange(len(train)) if indices is None else indices
    classes_seen = int(train.get_batch(pool)[1].unique().numel())
    if classes_seen < 2:
        raise ValueError(f"fine-tuning needs labelled train images of at least 2 classes, got "
                         f"{classes_seen}")
    device = next(backbone.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = Classifier(copy.deepcopy(backbone), train.num_classes, features)
        for param in model.parameters():
            param.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            layer_decay_groups(model.backbone, model.head, ft.weight_decay, ft.layer_decay),
            lr=ft.lr, betas=(0.9, 0.999))
        views = augmentation(train, seed)
        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = max(1, math.ceil(len(pool) / ft.batch_size))
        total = ft.epochs * steps_per_epoch
        warmup = round(ft.warmup_epochs * steps_per_epoch)
        step = 0
        model.train()
        for _ in range(ft.epochs):
            order = pool[torch.randperm(len(pool), generator=generator)]
            for start in range(0, len(order), ft.batch_size):
                images, y = train.get_batch(order[start : start + ft.batch_size])
                lr = warmup_cosine(step, total, warmup, ft.lr, 1e-6)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                loss = F.cross_entropy(model(views(images)[0].to(device)), y.to(device),
                                       label_smoothing=ft.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        return accuracy(model, test, limit=test_limit)
