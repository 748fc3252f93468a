"""Sharded image sets for collections too large for memory or for one file per image, written
and read with litdata (Lightning's streaming-data library, from the same ecosystem as Fabric).

``write_shards(SRC, DST)`` (``attnssl shard SRC DST``) decodes every image of an image folder
once (labelled by class sub-folder, or flat and unlabelled; ``train/`` and ``test/`` or ``val/``
splits where present, as ``data.dataset=imagefolder`` reads them), converts it to RGB at a
stored resolution (the shorter side resized to ``image_size``, centre-cropped, as
:func:`attnssl.data.datasets.decode_image`) and writes it as uint8 pixels into litdata chunks
under ``DST/<split>/``. Files that cannot be decoded are skipped and listed. ``DST/shards.json``
holds the classes, the stored size, the image count of each split and the skipped files;
:class:`attnssl.data.datasets.ShardDataset` reads them back.

Why litdata rather than webdataset: its chunks carry an index, so any image is read by its
position. The run's batch order (:mod:`attnssl.data.loader`: a seeded permutation of every
image, every W-th batch index to process r, skipped batches not loaded on resume) then works
on shards exactly as on the in-memory sets: shuffled across all shards, split across
processes and nodes, and resumed mid-epoch to the same batches. A tar stream (webdataset) is
read in order and shuffled in a buffer, which cannot resume mid-epoch to the same images.

Stored pixels cost ``3 x size^2`` bytes an image (196 kB at 256 px): more disk than JPEG files,
no decoding at training time.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from attnssl.data.datasets import (
    SHARDS_META,
    BadImageError,
    DatasetNotFoundError,
    ImageFolderDataset,
    decode_image,
)

SPLITS = {"train": ("train",), "test": ("test", "val")}


@dataclass
class ShardReport:
    """What :func:`write_shards` wrote: images per split and the files it skipped (with why)."""

    splits: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _source_splits(src: Path) -> dict[str, Path]:
    if not (src / "train").is_dir():
        return {"train": src}
    found = {"train": src / "train"}
    for name in SPLITS["test"]:
        if (src / name).is_dir():
            found["test"] = src / name
            break
    return found


def _encode(item, image_size: int, skipped_file: str):
    """litdata's per-item function: the decoded image, or nothing for a file that cannot be
    decoded (its path and reason appended to ``skipped_file``)."""
    path, label = item
    try:
        pixels = decode_image(Path(path), image_size)
    except BadImageError as err:
        with open(skipped_file, "a") as out:
            out.write(json.dumps([path, str(err.__cause__)]) + "\n")
        return
    yield {"image": pixels.numpy(), "label": int(label)}


def _optimize(optimize, **kwargs) -> None:
    """litdata's ``optimize``, leaving the process's multiprocessing start method as it was
    (litdata sets it to spawn for the whole process)."""
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True)
    try:
        optimize(**kwargs)
    finally:
        multiprocessing.set_start_method(method, force=True)


def write_shards(src: str | Path, dst: str | Path, image_size: int = 256,
                 chunk_mb: int = 64) -> ShardReport:
    """Shards of the image folder ``src`` under ``dst`` (see the module docstring)."""
    from litdata import optimize

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DatasetNotFoundError(f"attnssl shard: {src} is not a directory of images")
    if (dst / SHARDS_META).exists() or (dst.is_dir() and any(dst.iterdir())):
        raise FileExistsError(f"attnssl shard: {dst} is not empty; give a new folder")
    dst.mkdir(parents=True, exist_ok=True)
    report, classes = ShardReport(), None
    for split, folder in _source_splits(src).items():
        listing = ImageFolderDataset(folder, image_size, classes=classes)
        classes = listing.classes if classes is None else classes
        skipped_file = dst / f".skipped-{split}.jsonl"
        inputs = [(str(path), label) for path, label in listing.samples]
        _optimize(optimize, inputs=inputs, output_dir=str(dst / split), num_workers=1,
                  fn=partial(_encode, image_size=image_size, skipped_file=str(skipped_file)),
                  chunk_bytes=f"{chunk_mb}MB", mode="overwrite")
        skipped = ([tuple(json.loads(line)) for line in skipped_file.read_text().splitlines()]
                   if skipped_file.exists() else [])
        skipped_file.unlink(missing_ok=True)
        report.skipped += skipped
        report.splits[split] = len(inputs) - len(skipped)
        if report.splits[split] == 0:
            raise DatasetNotFoundError(f"attnssl shard: no readable images in {folder}")
    meta = {"classes": list(classes or ()), "image_size": image_size, "splits": report.splits,
            "skipped": [list(s) for s in report.skipped]}
    (dst / SHARDS_META).write_text(json.dumps(meta, indent=2))
    return report


def print_report(report: ShardReport, dst: Path) -> None:
    for path, reason in report.skipped:
        print(f"attnssl shard: skipped {path}: {reason}", file=sys.stderr)
    counts = ", ".join(f"{split} {n}" for split, n in report.splits.items())
    print(f"wrote shards of {counts} images to {dst} ({len(report.skipped)} skipped)")
