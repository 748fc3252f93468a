"""Dense check: are a method's patch tokens richer? A per-patch linear probe on the synthetic set.

Each method pretrains the B1 backbone (timm ViT, patch 4, width 128, depth 4, 4 heads) on the
procedural shapes dataset (32 px, so an 8x8 patch grid) for the same budget. Each patch of a
test image gets the label of its majority pixel in the dataset's mask: background or the class
of the shape it covers. A linear probe on the frozen, normalised patch tokens of the training
images is scored on the test images' patches, two ways: all patches (9 classes, background
included) and shape patches only (8 classes: does a patch know what object it is part of?).
The untrained backbone is the floor.

``--b1`` instead reads the protocol-B1 checkpoints (``results/b1.json``, Fashion-MNIST, same
budget for every method) with no new pretraining: a patch is foreground when most of its pixels
are non-zero (the garments lie on a black background) and then carries its image's class. The
probe is trained on the patches of the first ``--images`` training images and scored on those
of the first ``--test-images`` test images; each method is compared with the untrained backbone
of its own initialisation.

    python -m benchmarks.dense_patch_probe                 # udi, dino, bam; writes results/dense.json
    python -m benchmarks.dense_patch_probe --readme        # and replaces the DENSE block (docs/results.md)
    python -m benchmarks.dense_patch_probe --b1 --readme   # B1 checkpoints; block DENSE-B1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from attnssl.config import load_config
from attnssl.data.datasets import DatasetSpec, load_dataset
from attnssl.data.views import normalise
from attnssl.eval.linear import linear_probe_accuracy
from attnssl.nn.vit import build_vit
from attnssl.train.environment import machine_description
from attnssl.train.trainer import pretrain
from benchmarks.b1_checkpoints import fp32_checkpoints, untrained_backbone
from benchmarks.helpers import ROOT, machine_line, replace_readme_block

PRESETS = {"udi": "udi_synthetic", "dino": "dino_synthetic", "bam": "bam_synthetic"}
BACKBONE = ["model.preset=vit_tiny_p4", "model.patch_size=null", "model.embed_dim=null",
            "model.depth=null", "model.num_heads=null"]
METHOD_OVERRIDES = {  # UDI: 8x8 global grid -> 16 samples, 4x4 local grid -> 4 samples
    "udi": ["method.sampling_window_global=2", "method.sampling_window_local=2"],
}


def patch_labels(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, H, W)`` pixel labels -> ``(N, (H/p) * (W/p))`` majority label of each patch."""
    n, h, w = masks.shape
    classes = int(masks.max()) + 1
    one_hot = F.one_hot(masks.long(), classes).permute(0, 3, 1, 2).float()
    counts = F.avg_pool2d(one_hot, patch)  # (N, C, H/p, W/p)
    return counts.argmax(1).flatten(1)


@torch.no_grad()
def patch_tokens(backbone, dataset, batch_size: int = 256) -> torch.Tensor:
    """``(N, P, D)`` normalised last-layer patch tokens (class tokens dropped)."""
    backbone.eval()
    mean, std = dataset.mean_std
    out = []
    for start in range(0, len(dataset), batch_size):
        images, _ = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
        tokens = backbone.forward_features(normalise(images, mean, std))
        out.append(tokens[:, backbone.num_prefix_tokens:])
    return torch.cat(out)


def silhouette_labels(dataset, patch: int) -> torch.Tensor:
    """``(N, P)``: 0 for a background patch, else its image's class + 1 (foreground = most of
    the patch's pixels non-zero)."""
    masks = (dataset.images[:, 0] > 0).long()
    masks = masks * (dataset.labels.view(-1, 1, 1) + 1)
    return patch_labels(masks, patch)


def dense_scores(backbone, train, test, patch: int, epochs: int, y_train=None,
                 y_test=None) -> dict:
    """Patch-probe accuracy (%) on all patches and on foreground patches only; labels default
    to the datasets' masks."""
    x_train, x_test = patch_tokens(backbone, train), patch_tokens(backbone, test)
    if y_train is None:
        y_train, y_test = patch_labels(train.masks, patch), patch_labels(test.masks, patch)
    dim = x_train.shape[-1]
    x_train, x_test = x_train.reshape(-1, dim), x_test.reshape(-1, dim)
    y_train, y_test = y_train.reshape(-1), y_test.reshape(-1)
    classes = int(max(y_train.max(), y_test.max())) + 1
    fg_train, fg_test = y_train > 0, y_test > 0
    return {
        "all_patches": linear_probe_accuracy(x_train, y_train, x_test, y_test, classes, epochs),
        "shape_patches": linear_probe_accuracy(x_train[fg_train], y_train[fg_train] - 1,
                                               x_test[fg_test], y_test[fg_test] - 1,
                                               classes - 1, epochs),
        "shape_share": 100.0 * fg_test.float().mean().item(),
    }


def overrides(method: str, args, out_dir: Path) -> list[str]:
    return [*BACKBONE, *METHOD_OVERRIDES.get(method, []),
            f"data.synthetic_size={args.images}", f"optim.epochs={args.epochs}",
            f"optim.batch_size={args.batch}", f"run.out_dir={out_dir}",
            f"run.name=dense-{method}-{int(time.time())}", "trainer.progress_bar=false",
            "trainer.checkpoint_every_steps=100000", "eval.linear_probe=false"]


def b1_rows(args) -> list[dict]:
    """Dense scores of every fp32 B1 checkpoint and of the untrained backbone of each init."""
    rows, floors = [], {}
    for b1_row, loaded in fp32_checkpoints():
        config, patch = loaded.config, loaded.backbone.patch_embed.patch_size[0]
        train, test = loaded.train.subset(args.images), loaded.test.subset(args.test_images)
        labels = silhouette_labels(train, patch), silhouette_labels(test, patch)
        init = f"{config.model.weight_init} init"
        if config.model.attention != "softmax":
            init += f", {config.model.attention}"
        if init not in floors:
            floors[init] = {"method": f"untrained ({init})",
                            **dense_scores(untrained_backbone(loaded), train, test, patch,
                                           args.probe_epochs, *labels)}
            rows.append(floors[init])
        rows.append({"method": f"{b1_row['method']} ({init})",
                     **dense_scores(loaded.backbone, train, test, patch, args.probe_epochs,
                                    *labels),
                     "image_knn_top1": b1_row["knn_top1"]})
        print(table(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "benchmarks"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dense.json"))
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--b1", action="store_true",
                        help="probe the B1 Fashion-MNIST checkpoints instead of pretraining")
    parser.add_argument("--test-images", type=int, default=2000, help="with --b1")
    args = parser.parse_args()
    machine = machine_description()
    if args.b1:
        rows = b1_rows(args)
        command = (f"python -m benchmarks.dense_patch_probe --b1 --images {args.images} "
                   f"--test-images {args.test_images} --probe-epochs {args.probe_epochs}"
                   + (" --readme" if args.readme else ""))
        Path(args.out).with_name("dense_b1.json").write_text(
            json.dumps({"machine": machine, "command": command, "rows": rows}, indent=2))
        if args.readme:
            replace_readme_block("DENSE-B1", machine_line(machine, command) + "\n\n"
                                 + table(rows, "foreground"))
        return

    rows = []
    floor_done = False
    for method in args.methods:
        config = load_config(PRESETS[method], overrides(method, args, Path(args.runs_dir)))
        spec = DatasetSpec("synthetic", synthetic_size=args.images)
        train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
        patch = 4
        if not floor_done:
            torch.manual_seed(config.run.seed)
            untrained = build_vit(load_config(PRESETS[method], BACKBONE).model, 32, 3)
            rows.append({"method": "random init", **dense_scores(untrained, train, test, patch,
                                                                 args.probe_epochs)})
            floor_done = True
        metrics = pretrain(config)
        backbone = build_vit(config.model, 32, 3)
        backbone.load_state_dict(load_file(str(Path(metrics["run_dir"]) / "backbone.safetensors")))
        rows.append({"method": method, **dense_scores(backbone, train, test, patch,
                                                      args.probe_epochs),
                     "image_knn_top1": metrics["eval"]["knn_top1"],
                     "train_minutes": metrics["train_seconds"] / 60})
        print(table(rows), flush=True)
    command = (f"python -m benchmarks.dense_patch_probe --methods {' '.join(args.methods)} "
               f"--images {args.images} --epochs {args.epochs} --batch {args.batch}")
    Path(args.out).write_text(json.dumps({"machine": machine, "command": command, "rows": rows},
                                         indent=2))
    print(table(rows))
    if args.readme:
        replace_readme_block("DENSE", machine_line(machine, command) + "\n\n" + table(rows))


def table(rows: list[dict], foreground: str = "shape") -> str:
    lines = [f"| method | patch probe, all patches | patch probe, {foreground} patches "
             "| image k-NN |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        knn = f"{r['image_knn_top1']:.2f}" if "image_knn_top1" in r else "-"
        lines.append(f"| {r['method']} | {r['all_patches']:.2f} | {r['shape_patches']:.2f} | {knn} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
