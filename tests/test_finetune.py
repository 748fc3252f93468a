"""Fine-tuning and low-shot evaluation: subsets, layer-wise decay, and a model that learns."""

import pytest
import torch

from attnssl.config import FinetuneSection, load_config
from attnssl.data.datasets import TensorImageDataset
from attnssl.eval.finetune import balanced_subset, finetune_accuracy, layer_decay_groups
from attnssl.nn.vit import build_vit


def test_low_shot_subsets_are_fixed_class_balanced_and_seeded(generator):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([300, 120, 57])])
    labels = labels[torch.randperm(labels.numel(), generator=generator)]
    first = balanced_subset(labels, 0.1, seed=3)
    assert torch.equal(first, balanced_subset(labels, 0.1, seed=3))
    assert not torch.equal(first, balanced_subset(labels, 0.1, seed=4))
    assert first.unique().numel() == first.numel()
    counts = torch.bincount(labels[first], minlength=3).tolist()
    assert counts == [30, 12, 6]  # round(0.1 * n) per class
    assert torch.bincount(labels[balanced_subset(labels, 0.01)], minlength=3).tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="low-shot fraction must be in"):
        balanced_subset(labels, 0.0)


def test_layer_decay_scales_each_depth_as_mae():
    cfg = load_config(None, [])
    vit = build_vit(cfg.model, 28, 1)
    head = torch.nn.Linear(128, 10)
    groups = layer_decay_groups(vit, head, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    depth = len(vit.blocks)  # 4: embeddings 0.5^5, block i 0.5^(4 - i), head and norm 1
    assert scale[id(vit.patch_embed.proj.weight)] == (0.5**5, 0.05)
    assert scale[id(vit.pos_embed)] == (0.5**5, 0.0)
    assert scale[id(vit.cls_token)] == (0.5**5, 0.0)
    for i in range(depth):
        assert scale[id(vit.blocks[i].attn.qkv.weight)] == (0.5 ** (depth - i), 0.05)
        assert scale[id(vit.blocks[i].norm1.weight)] == (0.5 ** (depth - i), 0.0)
    assert scale[id(head.weight)] == (1.0, 0.05) and scale[id(head.bias)] == (1.0, 0.0)
    assert scale[id(vit.norm.weight)] == (1.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters())) + 2


def bright_or_dark(count: int, seed: int) -> TensorImageDataset:
    """Class 1 images are brighter than class 0's: a task any trained model must get right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=g)
    base = torch.where(labels.view(-1, 1, 1, 1) == 1, 170.0, 80.0)
    images = (base + 30 * torch.randn(count, 3, 32, 32, generator=g)).clamp(0, 255)
    return TensorImageDataset("synthetic", images.to(torch.uint8), labels, ("dark", "bright"))


def test_finetuning_learns_and_leaves_the_pretrained_backbone_alone():
    cfg = load_config("simclr_synthetic", [])
    torch.manual_seed(0)
    backbone = build_vit(cfg.model, 32, 3)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train, test = bright_or_dark(256, 0), bright_or_dark(128, 1)
    ft = FinetuneSection(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.5)
    assert finetune_accuracy(backbone, train, test, ft, "cls") >= 90.0
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    one_class = torch.nonzero(train.labels == 0).flatten()
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        finetune_accuracy(backbone, train, test, ft, "cls", indices=one_class)


def test_low_shot_shares_must_be_fractions():
    with pytest.raises(ValueError, match="low_shot shares must be in"):
        load_config(None, ["eval.low_shot=[0.01, 2]"])
