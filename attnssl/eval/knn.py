"""Weighted k-NN classification on frozen features (Wu et al. 2018, as in DINO's eval_knn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_knn_predict(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``(N_test, C)``: each test point's k nearest train points (cosine similarity
    ``s``) vote for their class with weight ``exp(s / T)``; ``score_c = sum_{j in top-k, y_j = c}
    exp(s_j / T)``."""
    if train_features.shape[0] < k:
        raise ValueError(f"k-NN with k={k} needs at least {k} train features, "
                         f"got {train_features.shape[0]}")
    bank = F.normalize(train_features.float(), dim=-1)
    queries = F.normalize(test_features.float(), dim=-1)
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=-1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of :func:`weighted_knn_predict`."""
    scores = weighted_knn_predict(train_features, train_labels, test_features, num_classes, k,
                                  temperature)
    return 100.0 * (scores.argmax(1) == test_labels).float().mean().item()
