"""Protocol B6 (docs/benchmarks.md): the input pipeline at 224 px, decode plus views.

Images per second of DINO's views (2 global crops of 224 px at scale 0.25 to 1, 6 local crops of
96 px at 0.05 to 0.25, flips, colour jitter, grayscale, blur and solarisation, normalised) from a
folder of JPEG photos-like images (512 x 384), with 0, 1 and 2 loader workers, for:

* ``ours, image folder``: ``data.dataset=imagefolder`` at ``data.image_size=256`` (each file
  decoded and resized in the workers), views made on whole batches;
* ``ours, shards``: the same images written once by ``attnssl shard --image-size 256`` and read
  by index, views made on whole batches;
* ``torchvision``: ``ImageFolder`` and ``DataLoader`` with DINO's per-image transforms
  (``DataAugmentationDINO`` of facebookresearch/dino, rebuilt from torchvision transforms),
  the anchor a user would pick.

The three are measured alternately, round after round, in one run, and the median round is
kept; the first batches of each measurement (worker start-up) are not timed. Batch 64.

    python -m benchmarks.b6_input_pipeline --readme
    python -m benchmarks.b6_input_pipeline --images 256 --batches 2 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attnssl.config import ViewsSection
from attnssl.data.datasets import ImageFolderDataset, ShardDataset
from attnssl.data.loader import BatchLoader, epoch_batches
from attnssl.data.shards import write_shards
from attnssl.data.views import MultiCropViews
from attnssl.train.environment import machine_description
from benchmarks.helpers import ROOT, machine_line, replace_readme_block

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GLOBAL, LOCAL, LOCAL_CROPS, STORED, BATCH = 224, 96, 6, 256, 64


def make_images(folder: Path, count: int) -> None:
    """Smooth colour fields with a few shapes, saved as JPEG (quality 90): files of photo-like
    size and decoding cost (noise would compress far worse than photographs)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    (folder / "all").mkdir(parents=True)
    ys, xs = np.mgrid[0:384, 0:512] / 512.0
    for i in range(count):
        a, b, c = rng.random(3)
        field = np.stack([np.sin(6 * a * xs + 3 * b * ys), np.cos(5 * b * xs - 4 * c * ys),
                          np.sin(7 * c * (xs + ys))], -1)
        image = Image.fromarray(((field + 1) * 127.5).astype("uint8"))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y, r = rng.integers(0, 512), rng.integers(0, 384), rng.integers(20, 90)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 255, 3)))
        image.save(folder / "all" / f"{i:05d}.jpg", quality=90)


def our_views() -> MultiCropViews:
    cfg = ViewsSection(global_crops=2, global_size=GLOBAL, global_scale=(0.25, 1.0),
                       local_crops=LOCAL_CROPS, local_size=LOCAL, local_scale=(0.05, 0.25))
    return MultiCropViews(cfg, STORED, 3, MEAN, STD, seed=0)


class DINOViews:
    """DINO's ``DataAugmentationDINO`` (facebookresearch/dino, main_dino.py) from torchvision
    transforms: per image, 2 global and ``LOCAL_CROPS`` local crops."""

    def __init__(self):
        from torchvision import transforms as T

        flip_and_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)])
        normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

        def blur(p):
            return T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=p)

        self.first = T.Compose([T.RandomResizedCrop(GLOBAL, scale=(0.25, 1.0), interpolation=3),
                                flip_and_jitter, blur(1.0), normalize])
        self.second = T.Compose([T.RandomResizedCrop(GLOBAL, scale=(0.25, 1.0), interpolation=3),
                                 flip_and_jitter, blur(0.1), T.RandomSolarize(128, p=0.2),
                                 normalize])
        self.local = T.Compose([T.RandomResizedCrop(LOCAL, scale=(0.05, 0.25), interpolation=3),
                                flip_and_jitter, blur(0.5), normalize])

    def __call__(self, image):
        return [self.first(image), self.second(image),
                *[self.local(image) for _ in range(LOCAL_CROPS)]]


def time_ours(dataset, workers: int, batches: int, warm: int = 1) -> float:
    loader, views = BatchLoader(dataset, workers), our_views()
    order = epoch_batches(len(dataset), BATCH, 0, seed=0)[: warm + batches]
    started = None
    for i, (images, _) in enumerate(loader(order)):
        if i == warm:
            started = time.perf_counter()
        views(images)
    return batches * BATCH / (time.perf_counter() - started)


def time_torchvision(folder: Path, workers: int, batches: int, warm: int = 1) -> float:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    loader = DataLoader(ImageFolder(str(folder), transform=DINOViews()), batch_size=BATCH,
                        shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    started = None
    for i, _ in enumerate(loader):
        if i == warm:
            started = time.perf_counter()
        if i == warm + batches:
            break
    return batches * BATCH / (time.perf_counter() - started)


def measure(images: int, batches: int, rounds: int, workers: list[int]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        make_images(folder, images)
        write_shards(folder, shards, image_size=STORED)
        sources = {"ours, image folder": lambda w: time_ours(
                       ImageFolderDataset(folder / "all", STORED), w, batches),
                   "ours, shards": lambda w: time_ours(ShardDataset(shards, "train"), w, batches),
                   "torchvision": lambda w: time_torchvision(folder, w, batches)}
        results = {(name, w): [] for name in sources for w in workers}
        for _ in range(rounds):
            for w in workers:
                for name, run in sources.items():  # alternately, every round
                    results[name, w].append(run(w))
                    print(f"{name}, {w} workers: {results[name, w][-1]:.0f} images/s", flush=True)
    return [{"source": name, "workers": w, "images_per_second": statistics.median(values),
             "rounds": values} for (name, w), values in results.items()]


def table(rows: list[dict], workers: list[int]) -> str:
    speed = {(r["source"], r["workers"]): r["images_per_second"] for r in rows}
    lines = ["| source | " + " | ".join(f"{w} workers" for w in workers) + " | x torchvision "
             f"({max(workers)} workers) |", "|" + " --- |" * (len(workers) + 2)]
    anchor = speed["torchvision", max(workers)]
    for source in dict.fromkeys(r["source"] for r in rows):
        cells = " | ".join(f"{speed[source, w]:.0f}" for w in workers)
        lines.append(f"| {source} | {cells} | {speed[source, max(workers)] / anchor:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=6, help="timed batches a measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b6.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = measure(args.images, args.batches, args.rounds, args.workers)
    markdown = table(rows, args.workers)
    print(markdown)
    machine = machine_description()
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    if args.readme:
        command = (f"python -m benchmarks.b6_input_pipeline --images {args.images} --batches "
                   f"{args.batches} --rounds {args.rounds}")
        replace_readme_block("B6", machine_line(machine, command) + "\n\n" + markdown)


if __name__ == "__main__":
    main()
