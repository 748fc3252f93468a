"""How fast views are made, next to how fast the model trains on them (same run, same machine).

Compares our batched multi-crop (one tensor call per operation over the batch) with the usual
per-image torchvision pipeline (PIL, ``RandomResizedCrop`` + flip + ``ColorJitter`` +
``ToTensor`` + ``Normalize`` per view), and with one SimCLR training step of the B1 backbone.
Reports images per second for each and the share of a step the views would take.

    python -m benchmarks.views_throughput [--batch 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torchvision import transforms as T

from attnssl.config import load_config
from attnssl.data.views import MultiCropViews
from attnssl.methods import build_method
from attnssl.nn.vit import build_vit
from attnssl.train.environment import machine_description

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config("simclr_fashion_mnist", ["views.color_jitter_prob=0.8"])
    images = torch.randint(0, 256, (args.batch, 1, 28, 28), dtype=torch.uint8)

    views = MultiCropViews(cfg.views, 28, 1, (0.286,), (0.353,))
    batched = median_seconds(lambda: views(images), args.repeats)

    per_image = T.Compose([
        T.RandomResizedCrop(28, scale=(0.4, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4)], p=0.8), T.ToTensor(),
        T.Normalize((0.286,), (0.353,)),
    ])  # fmt: skip
    pil_images = [T.functional.to_pil_image(img) for img in images]
    torchvision_s = median_seconds(
        lambda: [torch.stack([per_image(p) for p in pil_images]) for _ in range(2)], args.repeats
    )

    model = build_method(cfg, build_vit(cfg.model, 28, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch_views = views(images)

    def step():
        loss = model(batch_views)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step_s = median_seconds(step, max(2, args.repeats // 2))
    result = {
        "machine": machine_description(), "batch": args.batch,
        "batched_views_images_per_second": args.batch / batched,
        "torchvision_per_image_images_per_second": args.batch / torchvision_s,
        "speedup_batched_over_torchvision": torchvision_s / batched,
        "simclr_step_images_per_second": args.batch / step_s,
        "views_share_of_step": batched / (batched + step_s),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / "views.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
