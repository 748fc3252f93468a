"""Evaluation of a backbone's frozen features: weighted k-NN, linear probe, random-init floor."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from attnssl.data.datasets import DatasetSpec, ImageDataset, load_dataset
from attnssl.eval.features import extract_features
from attnssl.eval.finetune import balanced_subset, finetune_accuracy
from attnssl.eval.knn import knn_accuracy
from attnssl.eval.linear import linear_probe_accuracy
from attnssl.methods import evaluation_backbone_prefix
from attnssl.nn.vit import build_vit, run_eagerly
from attnssl.runs.checkpoint import load_training_checkpoint, resolve_checkpoint
from attnssl.runs.folder import run_folder_of_checkpoint
from attnssl.runs.trained import backbone_from_method_state, config_from_checkpoint


def dataset_spec(config) -> DatasetSpec:
    data = config.data
    return DatasetSpec(data.dataset, data.root, data.synthetic_size, data.image_size, data.subset,
                       data.skip_bad_images, data.synthetic_imbalance)


def load_eval_splits(config) -> tuple[ImageDataset, ImageDataset]:
    """The labelled train split (the k-NN bank, without ``data.subset``) and the test split."""
    spec = dataset_spec(config)
    full = dataclasses.replace(spec, subset=None)
    train = load_dataset(full, config.data.train_split)
    test = load_dataset(full, config.data.test_split)
    for split, ds in (("train", train), ("test", test)):
        if not ds.has_labels:
            raise ValueError(f"evaluation needs labels, but the {split} split of "
                             f"{spec.name} has none")
    if config.eval.linear_probe and train.num_classes < 2:
        raise ValueError(
            f"the linear probe needs at least 2 classes, but the train split of {spec.name} has "
            f"{train.num_classes}; add classes, or set eval.linear_probe=false"
        )
    return train, test


def backbone_image_size(config, dataset: ImageDataset) -> int:
    """The size the backbone is built for: the global crops' (positions interpolate for others)."""
    return config.views.global_size or dataset.image_size


def random_init_backbone(config, image_size: int, channels: int) -> nn.Module:
    """The backbone as the run initialised it (same seed), untrained: the floor to beat. With
    ``model.init_from`` it is still this random backbone, not the export the run started from."""
    with torch.random.fork_rng():
        torch.manual_seed(config.run.seed)
        return build_vit(config.model, image_size, channels)


@dataclass
class TrainedBackbone:
    """A run's evaluated backbone (the teacher where the method evaluates it), with its config
    and labelled evaluation splits."""

    backbone: nn.Module
    config: object
    checkpoint: Path
    step: int
    train: ImageDataset
    test: ImageDataset

    @property
    def run_dir(self) -> Path:
        """The run folder of the checkpoint, or the folder holding a checkpoint kept elsewhere."""
        return run_folder_of_checkpoint(self.checkpoint) or self.checkpoint.parent


def load_trained_backbone(target: str | Path, overrides: list[str] | None = None
                          ) -> TrainedBackbone:
    """The backbone of a run folder's newest checkpoint, or of a checkpoint file (loaded with
    ``weights_only=True``); ``key=value`` overrides change the config it is evaluated with."""
    checkpoint = resolve_checkpoint(target)
    state = load_training_checkpoint(checkpoint)
    config = config_from_checkpoint(state, overrides)
    train, test = load_eval_splits(config)
    backbone = build_vit(config.model, backbone_image_size(config, train), train.channels)
    backbone.load_state_dict(
        backbone_from_method_state(state["method"], evaluation_backbone_prefix(config.method)))
    return TrainedBackbone(backbone, config, checkpoint, state["train"]["step"], train, test)


def evaluate_features(backbone: nn.Module, config, train: ImageDataset, test: ImageDataset,
                      linear: bool = True) -> dict:
    ev = config.eval
    started = time.perf_counter()
    common = dict(kind=ev.features, batch_size=ev.batch_size, precision=ev.precision,
                  blocks=ev.blocks, size=backbone_image_size(config, train))
    x_train, y_train = extract_features(backbone, train, limit=ev.max_train, **common)
    x_test, y_test = extract_features(backbone, test, limit=ev.max_test, **common)
    result = {
        "knn_top1": knn_accuracy(x_train, y_train, x_test, y_test, train.num_classes, ev.knn_k,
                                 ev.knn_temperature),
    }
    if linear:
        result["linear_top1"] = linear_probe_accuracy(
            x_train, y_train, x_test, y_test, train.num_classes, ev.linear_epochs, ev.linear_lr,
            ev.linear_batch_size, seed=config.run.seed,
        )
    result["eval_seconds"] = time.perf_counter() - started
    return result


def low_shot_scores(backbone: nn.Module, config, train: ImageDataset,
                    test: ImageDataset) -> dict[str, dict[str, float]]:
    """Per label share (``eval.low_shot``): linear probe, and fine-tuning when enabled, trained
    on a fixed class-balanced subset of the train split (seed ``eval.low_shot_seed``, the same
    for every run, so methods are compared on the same images)."""
    ev = config.eval
    common = dict(kind=ev.features, batch_size=ev.batch_size, precision=ev.precision,
                  blocks=ev.blocks, size=backbone_image_size(config, train))
    x_train, y_train = extract_features(backbone, train, **common)
    x_test, y_test = extract_features(backbone, test, limit=ev.max_test, **common)
    scores = {}
    for share in ev.low_shot:
        idx = balanced_subset(y_train, share, seed=ev.low_shot_seed)
        row = {"train_images": int(idx.numel()), "linear_top1": linear_probe_accuracy(
            x_train[idx], y_train[idx], x_test, y_test, train.num_classes, ev.linear_epochs,
            ev.linear_lr, ev.linear_batch_size, seed=config.run.seed)}
        if ev.finetune.enabled:
            row["finetune_top1"] = finetune_accuracy(
                backbone, train, test, ev.finetune, ev.finetune.features or ev.features,
                indices=idx, seed=config.run.seed, test_limit=ev.max_test)
        scores[f"{100 * share:g}%"] = row
    return scores


def evaluate_backbone(backbone: nn.Module, config, train: ImageDataset | None = None,
                      test: ImageDataset | None = None) -> dict:
    """k-NN and linear accuracy of ``backbone``, and the k-NN of a random-init one beside it.
    Blocks compiled for training (``trainer.compile``) run eagerly here."""
    with run_eagerly():
        return _evaluate_backbone(backbone, config, train, test)


def _evaluate_backbone(backbone: nn.Module, config, train: ImageDataset | None,
                       test: ImageDataset | None) -> dict:
    if train is None or test is None:
        train, test = load_eval_splits(config)
    ev = config.eval
    result = {
        "dataset": train.name, "features": ev.features, "blocks": ev.blocks, "knn_k": ev.knn_k,
        "knn_temperature": ev.knn_temperature, "train_images": min(len(train), ev.max_train or
                                                                   len(train)),
        "test_images": min(len(test), ev.max_test or len(test)),
    }
    result.update(evaluate_features(backbone, config, train, test, linear=ev.linear_probe))
    if ev.low_shot:
        result["low_shot"] = low_shot_scores(backbone, config, train, test)
    if ev.finetune.enabled:
        result["finetune_top1"] = finetune_accuracy(
            backbone, train, test, ev.finetune, ev.finetune.features or ev.features,
            seed=config.run.seed, test_limit=ev.max_test)
    if ev.random_init_floor:
        untrained = random_init_backbone(config, backbone_image_size(config, train), train.channels)
        floor = evaluate_features(untrained, config, train, test, linear=False)
        result["knn_top1_random_init"] = floor["knn_top1"]
    return result
