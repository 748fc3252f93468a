"""Linear probe: a linear classifier trained on frozen, pre-computed features."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_probe_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    test_labels: torch.Tensor, num_classes: int, epochs: int = 30, lr: float = 1e-3,
    batch_size: int = 1024, weight_decay: float = 0.0, seed: int = 0,
) -> float:
    """Top-1 accuracy (%) of ``softmax(W BN(h) + b)`` trained by AdamW with cross-entropy.

    Features are standardised with the train split's mean and std (an affine-free batch norm,
    as in MAE's linear probe); the learning rate follows a cosine over ``epochs``.
    """
    classes_seen = int(train_labels.unique().numel())
    if classes_seen < 2:
        raise ValueError(
            f"the linear probe needs labelled train images of at least 2 classes, got "
            f"{classes_seen}"
        )
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True) + 1e-6
    x_train = (train_features - mean) / std
    x_test = (test_features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-x_train.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=generator)
        for start in range(0, x_train.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(x_train[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        predictions = classifier(x_test).argmax(1)
    return 100.0 * (predictions == test_labels).float().mean().item()
