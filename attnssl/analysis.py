"""``attnssl analyze``: what a pretrained ViT's attention learned, as numbers, figures and a report.

For one backbone, over the first test images of its dataset:

* per layer and head, on the patch-to-patch attention (class tokens left out, rows
  renormalised): the entropy ``mean_i H(a_i)`` (nats; ``log P`` is uniform), the mean attention
  distance ``mean_i sum_j a_ij ||x_i - x_j||`` in input pixels (Dosovitskiy et al. 2021), and the
  diversity ``1 - mean_{i != j} cos(a_i, a_j)`` across query patches (the theory paper's
  measure: 0 when every query attends to the same place), and the map's effective rank
  ``exp H(sigma / sum sigma)`` over its singular values (1: every query attends alike; CBSA's
  maps have at most m);
* the class token's attention to the patches: its entropy, and, where the dataset has
  foreground masks, attention-map segmentation: the Jaccard of the patches holding the top 60 %
  of its mass (DINO's ``visualize_attention.py`` threshold) against the mask, per head and for
  the mean over heads;
* collapse metrics of the evaluation features (``eval.features``): effective rank,
  per-dimension std, uniformity (Wang & Isola 2020) on clean images, and alignment between two
  crops-and-flips of each image.

Foreground masks: the synthetic dataset's shape masks; for Fashion-MNIST, whose garments lie on
an exactly black background, the non-zero pixels (a silhouette, not a hand-drawn mask).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from attnssl.data.datasets import ImageDataset
from attnssl.data.views import normalise
from attnssl.eval.features import evaluation_mode, split_batches
from attnssl.functional.attention_metrics import (
    alignment,
    attention_diversity,
    attention_entropy,
    attention_flow,
    attention_rollout,
    attention_segmentation_jaccard,
    class_token_attention,
    grid_positions,
    map_effective_rank,
    mean_attention_distance,
    patch_attention,
    rank_collapse_residual,
    uniformity,
)
from attnssl.functional.collapse import effective_rank, embedding_std
from attnssl.nn.attention import attention_maps
from attnssl.nn.vit import pool_features

SEGMENTATION_MASS = 0.6
HEAD_METRICS = ("entropy", "distance", "diversity", "rank", "cls_entropy")
FOREGROUND_SOURCES = {
    "synthetic": "the dataset's shape masks",
    "imbalance": "the dataset's shape masks (the class feature)",
    "fashion-mnist": "non-zero pixels (the garments lie on a black background)",
}


def foreground_masks(dataset: ImageDataset, indices: torch.Tensor,
                     images: torch.Tensor) -> torch.Tensor | None:
    """``(B, H, W)`` boolean foreground of ``images = dataset[indices]``, or None where the
    dataset has none."""
    masks = getattr(dataset, "masks", None)
    if masks is not None:
        return masks[indices] > 0
    if dataset.name == "fashion-mnist":
        return images[:, 0] > 0
    return None


def patch_grid(image_size: int, patch: int) -> tuple[int, int]:
    if image_size % patch:
        raise ValueError(f"analysis needs images that the patches tile exactly; {image_size} px "
                         f"is not a multiple of the patch size {patch}")
    return image_size // patch, image_size // patch


def _patch_size(backbone: nn.Module) -> int:
    size = backbone.patch_embed.patch_size
    return size[0] if isinstance(size, tuple) else size


@torch.no_grad()
def head_statistics(maps: list[torch.Tensor], prefix: int, grid: tuple[int, int], patch: int,
                    foreground: torch.Tensor | None = None,
                    mass: float = SEGMENTATION_MASS) -> dict[str, torch.Tensor]:
    """Per-layer, per-head means over the batch of ``maps`` (one ``(B, heads, N, N)`` per layer):
    each metric is a ``(layers, heads)`` tensor; ``jaccard_head_mean`` is ``(layers,)``."""
    positions = grid_positions(*grid, patch)
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in HEAD_METRICS}
    if foreground is not None:
        stats["jaccard"], stats["jaccard_head_mean"] = [], []
    for layer in maps:
        layer = layer.double()
        patches = patch_attention(layer, prefix)
        cls = class_token_attention(layer, prefix)  # (B, heads, P)
        stats["entropy"].append(attention_entropy(patches).mean(0))
        stats["distance"].append(mean_attention_distance(patches, positions).mean(0))
        stats["diversity"].append(attention_diversity(patches).mean(0))
        stats["rank"].append(map_effective_rank(patches).mean(0))
        stats["cls_entropy"].append(attention_entropy(cls.unsqueeze(-2)).mean(0))
        if foreground is not None:
            batch, heads, _ = cls.shape
            per_head = attention_segmentation_jaccard(
                cls.reshape(batch * heads, -1),
                foreground.repeat_interleave(heads, dim=0), patch, mass).view(batch, heads)
            stats["jaccard"].append(per_head.mean(0))
            stats["jaccard_head_mean"].append(
                attention_segmentation_jaccard(cls.mean(1), foreground, patch, mass).mean(0))
    return {name: torch.stack(values) for name, values in stats.items()}


def depth_statistics(maps: list[torch.Tensor], block_outputs: list[torch.Tensor], prefix: int,
                     patch: int, foreground: torch.Tensor | None = None,
                     mass: float = SEGMENTATION_MASS) -> dict[str, torch.Tensor]:
    """Per layer, means over the batch: the entropy of the class token's attention rollout over
    the patches (``rollout_cls_entropy``; with a foreground, its segmentation Jaccard,
    ``rollout_jaccard``), and the rank-collapse residual of the block's output tokens
    (``rank_collapse``). Each is ``(layers,)``."""
    rollouts = attention_rollout([m.double() for m in maps])
    cls = [class_token_attention(r.unsqueeze(1), prefix)[:, 0] for r in rollouts]  # (B, P)
    stats = {
        "rollout_cls_entropy": torch.stack([attention_entropy(c).mean() for c in cls]),
        "rank_collapse": torch.stack([rank_collapse_residual(t.double()).mean()
                                      for t in block_outputs]),
    }
    if foreground is not None:
        stats["rollout_jaccard"] = torch.stack([
            attention_segmentation_jaccard(c, foreground, patch, mass).mean() for c in cls])
    return stats


@dataclass
class AttentionPass:
    """Statistics averaged over all analysed images, and the maps of the first few to draw."""

    stats: dict[str, torch.Tensor]
    cls_maps: torch.Tensor  # (shown, layers, heads, P)
    images: torch.Tensor  # (shown, C, H, W) uint8
    foreground: torch.Tensor | None  # (shown, H, W)
    # the class token's rollout and flow over the patches after the last layer, of the first
    # flow_images images: (flow_images, 2, P), or None when no flow was asked for
    rollout_and_flow: torch.Tensor | None = None


@torch.no_grad()
def attention_pass(backbone: nn.Module, dataset: ImageDataset, count: int, shown: int = 4,
                   batch_size: int = 64, flow_images: int = 0) -> AttentionPass:
    """Run the backbone (eval mode) on the first ``count`` test images, recording attention;
    the class token's attention flow is solved for the first ``flow_images`` of the ``shown``
    images whose maps are kept."""
    count = min(count, len(dataset))
    if count < 1:
        raise ValueError("analysis needs at least one image")
    patch = _patch_size(backbone)
    grid = patch_grid(dataset.image_size, patch)
    prefix = backbone.num_prefix_tokens
    mean, std = dataset.mean_std
    device = next(backbone.parameters()).device
    totals: dict[str, torch.Tensor] = {}
    first = None
    with evaluation_mode(backbone):
        for indices, images, _ in split_batches(dataset, count, batch_size):
            foreground = foreground_masks(dataset, indices, images)
            outputs: list[torch.Tensor] = []
            hooks = [block.register_forward_hook(lambda _m, _i, out, kept=outputs: kept.append(out.cpu()))
                     for block in backbone.blocks]
            try:
                maps = [m.cpu() for m in attention_maps(backbone,
                                                        normalise(images, mean, std).to(device))]
            finally:
                for hook in hooks:
                    hook.remove()
            stats = head_statistics(maps, prefix, grid, patch, foreground)
            stats.update(depth_statistics(maps, outputs, prefix, patch, foreground))
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + value * len(indices)
            if first is None:
                cls = torch.stack([class_token_attention(m[:shown].double(), prefix)
                                   for m in maps], dim=1)
                first = (cls.float(), images[:shown],
                         None if foreground is None else foreground[:shown],
                         rollout_and_flow(maps, prefix, min(flow_images, shown)))
    return AttentionPass({k: v / count for k, v in totals.items()}, *first)


def rollout_and_flow(maps: list[torch.Tensor], prefix: int, images: int) -> torch.Tensor | None:
    """``(images, 2, P)``: the class token's attention rollout and attention flow to the
    patches after the last layer, each renormalised over the patches (None for 0 images)."""
    if images <= 0:
        return None
    first = [m[:images].double() for m in maps]
    rollout = class_token_attention(attention_rollout(first)[-1], prefix)
    flow = class_token_attention(attention_flow(first).unsqueeze(1), prefix)
    return torch.stack([rollout, flow], dim=1).float()


@torch.no_grad()
def collapse_statistics(backbone: nn.Module, dataset: ImageDataset, kind: str, count: int,
                        seed: int = 0, batch_size: int = 256) -> dict[str, float]:
    """Effective rank, per-dimension std and uniformity of the features of ``count`` clean test
    images, and the alignment of two crop-and-flip views of each."""
    from attnssl.eval.finetune import augmentation

    count = min(count, len(dataset))
    if count < 2:
        raise ValueError("collapse metrics need at least two images")
    mean, std = dataset.mean_std
    device = next(backbone.parameters()).device
    views = augmentation(dataset, seed)

    def features(x: torch.Tensor) -> torch.Tensor:
        tokens = backbone.forward_features(x.to(device))
        return pool_features(tokens, kind, backbone.num_prefix_tokens).float().cpu()

    clean, first, second = [], [], []
    with evaluation_mode(backbone):
        for _, images, _ in split_batches(dataset, count, batch_size):
            clean.append(features(normalise(images, mean, std)))
            first.append(features(views(images)[0]))
            second.append(features(views(images)[0]))
    z = torch.cat(clean)
    return {
        "effective_rank": effective_rank(z).item(),
        "embedding_std": embedding_std(z).item(),
        "uniformity": uniformity(z).item(),
        "alignment": alignment(torch.cat(first), torch.cat(second)).item(),
        "feature_dim": z.shape[1],
        "images": count,
    }


def analyze_backbone(backbone: nn.Module, dataset: ImageDataset, feature_kind: str = "cls",
                     images: int = 256, embed_images: int = 1024, seed: int = 0,
                     flow_images: int = 0) -> tuple[dict, AttentionPass]:
    """The JSON-ready analysis of ``backbone`` on ``dataset`` and the maps to draw."""
    attn = attention_pass(backbone, dataset, images, flow_images=flow_images)
    patch = _patch_size(backbone)
    grid = patch_grid(dataset.image_size, patch)
    result = {
        "images": min(images, len(dataset)),
        "patch_size": patch,
        "grid": list(grid),
        "class_tokens": backbone.num_prefix_tokens,
        "uniform_entropy": math.log(grid[0] * grid[1]),
        "per_head": {k: v.tolist() for k, v in attn.stats.items() if v.dim() == 2},
        "per_layer": {k: (v.mean(-1) if v.dim() == 2 else v).tolist()
                      for k, v in attn.stats.items()},
        "collapse": collapse_statistics(backbone, dataset, feature_kind, embed_images, seed),
        "features": feature_kind,
    }
    if attn.foreground is not None:
        result["segmentation"] = {
            "foreground": FOREGROUND_SOURCES.get(dataset.name, "dataset masks"),
            "mass": SEGMENTATION_MASS,
            "last_layer_head_mean": attn.stats["jaccard_head_mean"][-1].item(),
            "last_layer_best_head": attn.stats["jaccard"][-1].max().item(),
            "last_layer_mean_over_heads": attn.stats["jaccard"][-1].mean().item(),
        }
    if attn.rollout_and_flow is not None:
        rollout, flow = attn.rollout_and_flow.double().unbind(1)
        result["rollout_and_flow"] = {
            "images": len(flow),
            "last_layer_rollout_cls_entropy": attention_entropy(rollout.unsqueeze(1)).mean().item(),
            "last_layer_flow_cls_entropy": attention_entropy(flow.unsqueeze(1)).mean().item(),
        }
    return result, attn


UNIFORM_WITHIN = 0.01  # class-token entropy within 1 % of log P reads as uniform


def uniform_layers_sentence(result: dict) -> str:
    """A plain sentence naming the layers whose class-token attention is indistinguishable from
    uniform (mean entropy within 1 % of log P), or ``""`` when there are none."""
    uniform = result["uniform_entropy"]
    layers = [i + 1 for i, h in enumerate(result["per_layer"]["cls_entropy"])
              if h >= (1 - UNIFORM_WITHIN) * uniform]
    if not layers:
        return ""
    which = ", ".join(map(str, layers))
    return (f"The class token's attention in layer{'s' * (len(layers) > 1)} {which} is "
            f"indistinguishable from uniform: its entropy is within {UNIFORM_WITHIN:.0%} of "
            f"log P = {uniform:.3f} nats, so its maps show noise, not structure.")


def summary_table(result: dict) -> str:
    """Markdown: one row per layer, each metric averaged over heads."""
    layer = result["per_layer"]
    has_jaccard = "jaccard" in layer
    columns = ["layer", "entropy (nats)", "distance (px)", "diversity", "effective rank",
               "CLS entropy"]
    columns += ["Jaccard (head mean)"] if has_jaccard else []
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for i in range(len(layer["entropy"])):
        row = (f"| {i + 1} | {layer['entropy'][i]:.3f} | {layer['distance'][i]:.2f} | "
               f"{layer['diversity'][i]:.3f} | {layer['rank'][i]:.1f} | "
               f"{layer['cls_entropy'][i]:.3f} |")
        if has_jaccard:
            row += f" {layer['jaccard_head_mean'][i]:.3f} |"
        lines.append(row)
    c = result["collapse"]
    lines.append("")
    if result.get("uniform_layers"):
        lines.append(result["uniform_layers"])
    lines.append(f"uniform entropy log P = {result['uniform_entropy']:.3f}; features "
                 f"'{result['features']}': effective rank {c['effective_rank']:.1f} of "
                 f"{c['feature_dim']}, std {c['embedding_std']:.4f}, alignment "
                 f"{c['alignment']:.3f}, uniformity {c['uniformity']:.3f}")
    return "\n".join(lines)


def analyze_run(target: str | Path, out: Path | None = None, overrides: list[str] | None = None,
                images: int = 256, shown: int = 4, flow_images: int = 2) -> dict:
    """Analyse a run folder or checkpoint; write ``analysis.json``, ``figures/*.png`` and a
    self-contained ``report.html`` into ``out`` (default: the run folder). The attention flow
    of the trained backbone is solved for ``flow_images`` images (0: none)."""
    from attnssl.eval.evaluate import load_trained_backbone
    from attnssl.report import (
        plot_class_token_attention,
        plot_layer_metrics,
        plot_segmentation,
        plot_training_curves,
        write_html_report,
    )

    loaded = load_trained_backbone(target, overrides)
    out = Path(out) if out is not None else loaded.run_dir
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    result, attn = analyze_backbone(loaded.backbone, loaded.test, config.eval.features, images,
                                    seed=config.run.seed, flow_images=flow_images)
    result.update({
        "run_dir": str(loaded.run_dir), "checkpoint": str(loaded.checkpoint),
        "step": loaded.step, "method": config.method.name, "dataset": config.data.dataset,
        "model": {"preset": config.model.preset, "attention": config.model.attention,
                  "block": config.model.block},
    })
    from attnssl.eval.evaluate import backbone_image_size, random_init_backbone

    untrained = random_init_backbone(config, backbone_image_size(config, loaded.train),
                                     loaded.train.channels)
    reference, _ = analyze_backbone(untrained, loaded.test, config.eval.features, images,
                                    seed=config.run.seed)
    result["untrained"] = {"per_layer": reference["per_layer"],
                           "collapse": reference["collapse"]}
    result["uniform_layers"] = uniform_layers_sentence(result)
    figures: list[tuple[str, Path]] = []
    curves = plot_training_curves(loaded.run_dir, figures_dir / "training_curves.png")
    if curves is not None:
        figures.append(("training curves (metrics.csv)", curves))
    figures.append(("attention metrics per layer and head",
                    plot_layer_metrics(result, figures_dir / "attention_by_layer.png")))
    for layer in range(attn.cls_maps.shape[1]):
        figures.append((f"class-token attention, layer {layer + 1} (columns: heads, then their "
                        f"mean)", plot_class_token_attention(
                            attn.images, attn.cls_maps[:, layer], result["grid"],
                            figures_dir / f"cls_attention_layer{layer + 1}.png")))
    if attn.rollout_and_flow is not None:
        figures.append(("class token after the last layer: attention rollout and attention flow "
                        "(Abnar & Zuidema 2020)", plot_class_token_attention(
                            attn.images[:len(attn.rollout_and_flow)], attn.rollout_and_flow,
                            result["grid"], figures_dir / "rollout_and_flow.png",
                            titles=["rollout", "flow"])))
    if attn.foreground is not None:
        figures.append((f"segmentation: top-{SEGMENTATION_MASS:.0%} class-token attention "
                        "(last layer, mean over heads) against the foreground",
                        plot_segmentation(attn.images, attn.foreground, attn.cls_maps[:, -1],
                                          result["grid"], SEGMENTATION_MASS,
                                          figures_dir / "segmentation.png")))
    result["figures"] = [str(path.relative_to(out)) for _, path in figures]
    result["summary_table"] = summary_table(result)
    evaluation = _latest_evaluation(loaded.run_dir)
    if evaluation:
        result["evaluation"] = evaluation
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    result["report"] = str(write_html_report(out / "report.html", result, figures))
    return result


def _latest_evaluation(run_dir: Path) -> dict | None:
    """The run's evaluation scores: the newest ``eval-step-*.json``, else ``metrics.json``."""
    evals = sorted((p for p in run_dir.glob("eval-step-*.json") if p.stat().st_size),
                   key=lambda p: p.stat().st_mtime_ns)
    if evals:
        return json.loads(evals[-1].read_text())
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text()).get("eval")
    return None
