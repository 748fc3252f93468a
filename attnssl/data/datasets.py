"""Datasets by name, each returning uint8 image tensors ``(C, H, W)`` of one fixed size.

Small datasets (Fashion-MNIST, CIFAR, STL-10, synthetic, imbalance) are held in memory as one uint8 tensor so
a batch is a single index; ``imagefolder`` decodes lazily, one file at a time, in loader workers;
``shards`` reads stored pixels by index from litdata chunks (``attnssl shard``), in workers too.
Views (crops, flips, colour) are made afterwards, on whole batches (``attnssl.data.views``).

CIFAR and STL-10 are read from the files torchvision downloads, in the same layout under the given
root, by our own readers: torchvision's classes insist on the full files' MD5 sums, and its CIFAR
reader unpickles with the general unpickler. Ours accepts any well-formed file in the format and
unpickles through an allow-list of numpy array constructors, so a crafted file cannot run code.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# Per-channel mean and std of the training split, in [0, 1] units.
NORMALISATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    # at its default strength, 4 (at 1: 0.35 and 0.19; at 16: 0.49 and 0.26)
    "imbalance": ((0.45,), (0.25,)),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message says where and how to get them."""


class ImageDataset(Dataset):
    """Images of one size as uint8 ``(C, H, W)`` and integer labels (-1 where unlabelled).

    ``get_batch(indices)`` returns ``(images (B, C, H, W) uint8, labels (B,) int64)``.
    """

    name: str = ""
    classes: tuple[str, ...] = ()
    channels: int = 3
    image_size: int = 32
    in_memory: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return NORMALISATION[self.name]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class TensorImageDataset(ImageDataset):
    """An in-memory dataset: ``images`` (N, C, H, W) uint8, ``labels`` (N,), optional ``masks``."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: tuple[str, ...],
        masks: torch.Tensor | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{name}: images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.name = name
        self.images = images.contiguous()
        self.labels = labels.long()
        self.classes = tuple(classes)
        self.masks = masks
        self.channels = images.shape[1]
        self.image_size = images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]

    def subset(self, count: int) -> TensorImageDataset:
        """The first ``count`` images (all of them where there are fewer)."""
        masks = None if self.masks is None else self.masks[:count]
        return TensorImageDataset(
            self.name, self.images[:count], self.labels[:count], self.classes, masks
        )


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 | dtype 0x08 (uint8) | ndim, then sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(
            f"{path}: IDX header promises {expected} bytes of shape {shape}, "
            f"file holds {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(root: str | None, split: str) -> TensorImageDataset:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    candidates = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    for directory in candidates:
        images = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            x = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
            y = torch.from_numpy(read_idx(labels).astype(np.int64))
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{images} holds {x.shape[0]} images but {labels} "
                                 f"{y.shape[0]} labels")
            return TensorImageDataset("fashion-mnist", x, y, FASHION_MNIST_CLASSES)
    looked = ", ".join(str(d) for d in candidates)
    raise DatasetNotFoundError(
        f"fashion-mnist {split} split not found: looked for {prefix}-images-idx3-ubyte[.gz] and "
        f"{prefix}-labels-idx1-ubyte[.gz] in {looked}. Install it with "
        f"'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu; files land in "
        f"{FASHION_MNIST_DIRS[0]}), or download the four IDX files from "
        f"github.com/zalandoresearch/fashion-mnist and pass data.root=DIR."
    )


# ----------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            obj = _ArrayUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"{path}: {err}; it holds code or objects a CIFAR file "
                                     f"does not, so it was not loaded") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(values) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


CIFAR_LAYOUT = {
    # name: (folder, train files, test files, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
                 "fine_label_names"),
}


def load_cifar(name: str, root: str | None, split: str) -> TensorImageDataset:
    folder, train_files, test_files, meta, label_key, names_key = CIFAR_LAYOUT[name]
    if split not in ("train", "test"):
        raise ValueError(f"{name} has splits 'train' and 'test', not {split!r}")
    base = Path(root or "data") / folder
    files = [base / f for f in (train_files if split == "train" else test_files)]
    missing = [str(f) for f in files + [base / meta] if not f.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} {split} split not found: missing {', '.join(missing)}. Download it once with "
            f"torchvision.datasets.{name.upper()}(root={str(base.parent)!r},"
            f" download=True) on a machine with internet access, or extract the python version "
            f"archive so that {base} exists, then pass data.root={base.parent}."
        )
    images, labels = [], []
    for f in files:
        batch = _load_pickle(f)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{f}: 'data' must be N x 3072 uint8, got shape {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    classes = _names(_load_pickle(base / meta)[names_key])
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(labels))
    return TensorImageDataset(name, x, y, classes)


# ----------------------------------------------------------------------------- STL-10

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def load_stl10(root: str | None, split: str) -> TensorImageDataset:
    """STL-10 binary files: images as uint8 (N, 3, 96, 96) column-major, labels 1..10."""
    base = Path(root or "data") / "stl10_binary"
    files = {
        "train": ("train_X.bin", "train_y.bin"),
        "test": ("test_X.bin", "test_y.bin"),
        "unlabeled": ("unlabeled_X.bin", None),
    }
    if split not in files:
        raise ValueError(f"stl10 has splits {', '.join(files)}, not {split!r}")
    x_name, y_name = files[split]
    needed = [base / x_name] + ([base / y_name] if y_name else [])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"stl10 {split} split not found: missing {', '.join(missing)}. Download it once with "
            f"torchvision.datasets.STL10(root={str(base.parent)!r}, download=True) on a machine "
            f"with internet access, then pass data.root={base.parent}."
        )
    raw = np.fromfile(base / x_name, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise ValueError(f"{base / x_name}: size {raw.size} is not a multiple of 3*96*96")
    x = torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())
    if y_name:
        y = torch.from_numpy(np.fromfile(base / y_name, dtype=np.uint8).astype(np.int64) - 1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{base}: {x.shape[0]} images but {y.shape[0]} labels")
    else:
        y = torch.full((x.shape[0],), -1, dtype=torch.int64)
    return TensorImageDataset("stl10", x, y, STL10_CLASSES)


# ----------------------------------------------------------------------------- image folder


class BadImageError(ValueError):
    """A file with an image extension that Pillow cannot decode (corrupt, truncated, not an
    image)."""


def _to_rgb(img):
    """Any Pillow mode to 8-bit RGB: 16-bit grayscale scaled by 255/65535 (not clipped), palette
    and alpha images composited over black (transparent pixels become black), grayscale
    repeated over the three channels."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if img.mode == "P" or "A" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return img.convert("RGB")


def decode_image(path: Path, size: int) -> torch.Tensor:
    """``(3, size, size)`` uint8: the image converted to RGB (:func:`_to_rgb`), its shorter
    side resized to ``size`` (smaller images are upsampled) and centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise BadImageError(
            f"{path} cannot be decoded as an image: it has more pixels than Pillow's limit of "
            f"{Image.MAX_IMAGE_PIXELS} ({err}); shrink it, remove it, or set "
            f"data.skip_bad_images=true to leave such files out"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(
            f"{path} cannot be decoded as an image ({err}); remove or replace it, or set "
            f"data.skip_bad_images=true to leave unreadable files out"
        ) from err
    rgb = center_crop(resize(rgb, size), [size, size])
    return pil_to_tensor(rgb)


_READABLE: dict[tuple, list] = {}  # ImageFolderDataset._readable's results, by files and mtimes


class ImageFolderDataset(ImageDataset):
    """Any folder of images: labelled by sub-folder (``root/<class>/*.png``) or flat (unlabelled).

    Files are chosen by extension (``IMAGE_EXTENSIONS``; others are ignored) and decoded lazily
    by :func:`decode_image`, so every item has the same shape whatever the file's mode (8 or
    16 bit, grayscale, RGB, RGBA, palette) or size. A file that cannot be decoded stops the run
    with its name, unless ``skip_bad_images``: then every file is decoded once here and the
    unreadable ones are left out and listed on stderr.
    """

    in_memory = False

    def __init__(self, root: str | Path, image_size: int, skip_bad_images: bool = False,
                 classes: tuple[str, ...] | None = None):
        """``classes``: the class names that number the labels (the training split's, for an
        evaluation split); a class folder outside them is refused by name. ``None``: this
        folder's own sub-folders, sorted."""
        self.name = "imagefolder"
        self.root = Path(root)
        self.image_size = image_size
        self.channels = 3
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"imagefolder: {self.root} is not a directory")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        if class_dirs:
            self.classes = tuple(p.name for p in class_dirs) if classes is None else classes
            unknown = [d.name for d in class_dirs if d.name not in self.classes]
            if unknown:
                raise ValueError(
                    f"imagefolder: {self.root} has class folders the training split lacks: "
                    f"{', '.join(unknown)}; its classes must be among the training split's "
                    f"({', '.join(self.classes)})")
            index = {name: i for i, name in enumerate(self.classes)}
            self.samples = [
                (f, index[d.name]) for d in class_dirs for f in sorted(d.rglob("*"))
                if is_image_file(f)
            ]
        else:
            self.classes = ()
            self.samples = [(f, -1) for f in sorted(self.root.iterdir()) if is_image_file(f)]
        if skip_bad_images:
            self.samples = self._readable(self.samples)
        if not self.samples:
            raise DatasetNotFoundError(
                f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.root}"
            )

    def _readable(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """The samples that decode; each file is checked (and a bad one listed) once per
        process, though a run opens its training split twice (to train, and as the k-NN
        bank)."""
        import sys

        key = tuple((str(path), path.stat().st_mtime_ns) for path, _ in samples)
        if key in _READABLE:
            return _READABLE[key]
        kept = []
        for path, label in samples:
            try:
                decode_image(path, 1)
                kept.append((path, label))
            except BadImageError as err:
                print(f"imagefolder: leaving out {err.args[0].split(' cannot')[0]}: "
                      f"{err.__cause__}", file=sys.stderr)
        _READABLE[key] = kept
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return decode_image(path, self.image_size), label


def is_image_file(path: Path) -> bool:
    """An image by its extension, leaving out macOS's ``._name`` metadata files (AppleDouble),
    which carry an image's extension but hold no image."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("._")


def load_imagefolder(root: str | None, split: str, image_size: int,
                     skip_bad_images: bool = False) -> ImageFolderDataset:
    """``root/train`` and ``root/test`` (or ``root/val``) where present, else ``root`` is train."""
    if root is None:
        raise DatasetNotFoundError("imagefolder needs data.root=DIR (a folder of images)")
    base = Path(root)
    if (base / "train").is_dir():
        names = {"train": ["train"], "test": ["test", "val"]}.get(split, [split])
        # every split numbers its labels by the training split's classes
        train_classes = tuple(sorted(p.name for p in (base / "train").iterdir() if p.is_dir()))
        for name in names:
            if (base / name).is_dir():
                return ImageFolderDataset(base / name, image_size, skip_bad_images,
                                          classes=train_classes if split != "train" else None)
        raise DatasetNotFoundError(f"imagefolder: no {split!r} split under {base} (looked for "
                                   f"{', '.join(str(base / n) for n in names)})")
    if split == "train":
        return ImageFolderDataset(base, image_size, skip_bad_images)
    raise DatasetNotFoundError(
        f"imagefolder: {base} has no train/ and test/ (or val/) sub-folders, so it has no "
        f"{split!r} split"
    )


# ----------------------------------------------------------------------------- shards

SHARDS_META = "shards.json"


class ShardDataset(ImageDataset):
    """One split of an ``attnssl shard`` folder (:func:`attnssl.data.shards.write_shards`),
    read by index with litdata (``data.dataset=shards``).

    The litdata reader opens lazily in each process and loader worker (it holds file handles
    that do not cross a fork). Items are read by their global index: under several processes
    litdata's own length is each process's share, but its random access is not, and the run's
    batch order (:mod:`attnssl.data.loader`) splits the indices across processes itself.
    """

    in_memory = False

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        meta_path = self.root / SHARDS_META
        if not meta_path.is_file():
            raise DatasetNotFoundError(
                f"shards: {meta_path} is missing; write shards with attnssl shard SRC "
                f"{self.root}")
        meta = json.loads(meta_path.read_text())
        if split not in meta["splits"]:
            raise DatasetNotFoundError(
                f"shards: {self.root} has no {split!r} split (it has "
                f"{', '.join(meta['splits'])})")
        self.name, self.split = "shards", split
        self.classes = tuple(meta["classes"])
        self.image_size, self.channels = meta["image_size"], 3
        self.count = meta["splits"][split]
        self._reader = None
        self._reader_pid = None

    @property
    def mean_std(self):
        return NORMALISATION["imagefolder"]

    def _stream(self):
        if self._reader is None or self._reader_pid != os.getpid():
            from litdata import StreamingDataset

            self._reader = StreamingDataset(str(self.root / self.split))
            self._reader_pid = os.getpid()
        return self._reader

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self._stream()[index]
        return torch.from_numpy(item["image"]), int(item["label"])

    def __getstate__(self):  # loader workers open their own reader
        return {**self.__dict__, "_reader": None, "_reader_pid": None}


def load_shards(root: str | None, split: str, image_size: int | None) -> ShardDataset:
    if root is None:
        raise DatasetNotFoundError("shards needs data.root=DIR (a folder written by attnssl shard)")
    dataset = ShardDataset(root, split)
    if image_size is not None and image_size != dataset.image_size:
        raise ValueError(f"data.image_size={image_size}, but the shards in {root} hold "
                         f"{dataset.image_size} px images; leave data.image_size unset or write "
                         f"the shards again with attnssl shard --image-size {image_size}")
    return dataset


# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = ("disc", "square", "diamond", "triangle", "ring", "cross", "bar", "saltire")


def _shape_masks(label: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor):
    """Boolean (N, S, S) masks of each image's shape, from offsets to its centre and its radius."""
    dist2 = dx**2 + dy**2
    adx, ady = dx.abs(), dy.abs()
    arm = r / 3
    shapes = torch.stack([
        dist2 <= r**2,                                                    # disc
        torch.maximum(adx, ady) <= 0.8 * r,                               # square
        adx + ady <= r,                                                   # diamond
        (ady <= 0.8 * r) & (adx <= (dy + 0.8 * r) * 0.6),                 # triangle
        (dist2 <= r**2) & (dist2 >= (0.55 * r) ** 2),                     # ring
        ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r)),        # cross
        (ady <= 0.35 * r) & (adx <= r),                                   # bar
        (((dx - dy).abs() <= arm) | ((dx + dy).abs() <= arm)) & (dist2 <= r**2),  # saltire
    ], dim=1)  # fmt: skip
    return shapes[torch.arange(label.shape[0]), label]


def make_synthetic(count: int, image_size: int = 32, seed: int = 0, num_classes: int = 8):
    """Procedural shapes on textured backgrounds: images, labels and per-pixel masks.

    Each image holds one shape of its class at a random place, size and colour over a random
    striped texture with noise. ``masks[n, y, x]`` is ``label + 1`` on the shape and 0 elsewhere,
    for dense probes and attention-map segmentation.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"synthetic num_classes must be in 1..{len(SYNTHETIC_CLASSES)}")
    g = torch.Generator().manual_seed(seed)
    n, s = count, image_size

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    label = torch.randint(0, num_classes, (n,), generator=g)
    r = uniform(n, 1, 1, low=0.18 * s, high=0.32 * s)
    cx = uniform(n, 1, 1) * (s - 2 * r - 2) + r + 1
    cy = uniform(n, 1, 1) * (s - 2 * r - 2) + r + 1
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    dx, dy = xx - cx, yy - cy
    shape = _shape_masks(label, dx, dy, r)

    freq = uniform(n, 2, 1, 1, low=0.05, high=0.35)
    phase = uniform(n, 1, 1, high=6.283)
    stripes = torch.sin(6.283 * (freq[:, 0] * xx + freq[:, 1] * yy) + phase)
    bg_colour = uniform(n, 3, 1, 1, low=0.2, high=0.8)
    background = bg_colour + 0.15 * stripes.unsqueeze(1) + 0.06 * torch.randn(n, 3, s, s, generator=g)
    fg_colour = uniform(n, 3, 1, 1)
    # keep the shape visible: push its colour away from the background's
    fg_colour = torch.where((fg_colour - bg_colour).abs() < 0.3, 1 - fg_colour, fg_colour)
    foreground = fg_colour + 0.04 * torch.randn(n, 3, s, s, generator=g)
    image = torch.where(shape.unsqueeze(1), foreground, background)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    masks = torch.where(shape, label.view(n, 1, 1) + 1, torch.zeros_like(label).view(n, 1, 1))
    return images, label, masks


def load_synthetic(split: str, size: int, image_size: int = 32) -> TensorImageDataset:
    seeds = {"train": 0, "test": 1}
    if split not in seeds:
        raise ValueError(f"synthetic has splits 'train' and 'test', not {split!r}")
    count = size if split == "train" else max(size // 4, 1)
    images, labels, masks = make_synthetic(count, image_size, seed=seeds[split])
    return TensorImageDataset("synthetic", images, labels, SYNTHETIC_CLASSES, masks)


def make_imbalance(count: int, image_size: int = 28, imbalance: float = 4.0, seed: int = 0,
                   period: float = 0.5, angle: float = math.pi / 6):
    """Grayscale images of one dominant global feature shared by every image and a weaker
    local one that carries the class (the theory paper's feature imbalance, on pixels).

    Pixel ``(y, x)`` of image ``n`` is ``v = g_n cos(2 pi (x cos a + y sin a) / (period S) +
    phi_n) + l_n m_n(y, x)``, mapped to [0, 1] by ``(v + imbalance) / (2 imbalance + 1)`` plus
    noise (std 0.02): a grating of one orientation ``a`` and period over the whole image with a
    random phase ``phi_n`` and amplitude ``g_n ~ imbalance * U[0.5, 1]``, and one small shape
    ``m_n`` of the image's class (:data:`SYNTHETIC_CLASSES`, radius 12-18 % of the side, at a
    random place) of strength ``l_n ~ U[0.5, 1]``. ``imbalance`` is the ratio of the two
    strengths; 0 leaves the shapes alone. Returns images ``(N, 1, S, S)`` uint8, labels, the
    shapes' masks (``label + 1`` on the shape) and the amplitudes ``(g, l)``.
    """
    if imbalance < 0:
        raise ValueError(f"imbalance must be at least 0, got {imbalance}")
    g = torch.Generator().manual_seed(seed)
    n, s = count, image_size

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    label = torch.randint(0, len(SYNTHETIC_CLASSES), (n,), generator=g)
    r = uniform(n, 1, 1, low=0.12 * s, high=0.18 * s)
    cx = uniform(n, 1, 1) * (s - 2 * r - 2) + r + 1
    cy = uniform(n, 1, 1) * (s - 2 * r - 2) + r + 1
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    shape = _shape_masks(label, xx - cx, yy - cy, r)
    phase = uniform(n, 1, 1, high=2 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    grating = torch.cos(2 * math.pi * along / (period * s) + phase)
    global_amp = imbalance * uniform(n, 1, 1, low=0.5, high=1.0)
    local_amp = uniform(n, 1, 1, low=0.5, high=1.0)
    value = global_amp * grating + local_amp * shape
    image = (value + imbalance) / (2 * imbalance + 1) + 0.02 * torch.randn(n, s, s, generator=g)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)
    masks = torch.where(shape, label.view(n, 1, 1) + 1, torch.zeros_like(label).view(n, 1, 1))
    return images, label, masks, (global_amp.flatten(), local_amp.flatten())


def load_imbalance(split: str, size: int, imbalance: float,
                   image_size: int = 28) -> TensorImageDataset:
    seeds = {"train": 0, "test": 1}
    if split not in seeds:
        raise ValueError(f"imbalance has splits 'train' and 'test', not {split!r}")
    count = size if split == "train" else max(size // 6, 1)
    images, labels, masks, _ = make_imbalance(count, image_size, imbalance, seed=seeds[split])
    return TensorImageDataset("imbalance", images, labels, SYNTHETIC_CLASSES, masks)


# ----------------------------------------------------------------------------- by name


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str | None = None
    synthetic_size: int = 2000
    image_size: int | None = None
    subset: int | None = None
    skip_bad_images: bool = False
    synthetic_imbalance: float = 4.0


def load_dataset(spec: DatasetSpec, split: str) -> ImageDataset:
    """Load one split of a dataset by name; see the module docstring for the sources."""
    try:
        return _load_dataset(spec, split)
    except DatasetNotFoundError as err:
        if spec.root is None or Path(spec.root).is_absolute():
            raise
        raise DatasetNotFoundError(
            f"{err} (data.root={spec.root} is a relative path, read from the current folder "
            f"{Path.cwd()}; give an absolute one, e.g. --data-root "
            f"{Path(spec.root).resolve()} if that is where the data is)") from None


def _load_dataset(spec: DatasetSpec, split: str) -> ImageDataset:
    name = spec.name
    if name == "fashion-mnist":
        dataset = load_fashion_mnist(spec.root, split)
    elif name in CIFAR_LAYOUT:
        dataset = load_cifar(name, spec.root, split)
    elif name == "stl10":
        dataset = load_stl10(spec.root, split)
    elif name == "synthetic":
        dataset = load_synthetic(split, spec.synthetic_size, spec.image_size or 32)
    elif name == "imbalance":
        dataset = load_imbalance(split, spec.synthetic_size, spec.synthetic_imbalance,
                                 spec.image_size or 28)
    elif name == "imagefolder":
        dataset = load_imagefolder(spec.root, split, spec.image_size or 64, spec.skip_bad_images)
    elif name == "shards":
        dataset = load_shards(spec.root, split, spec.image_size)
    else:
        raise ValueError(
            f"unknown dataset {name!r}; accepted: fashion-mnist, synthetic, imbalance, "
            f"imagefolder, shards, cifar10, cifar100, stl10"
        )
    if spec.subset is not None and split == "train" and isinstance(dataset, TensorImageDataset):
        dataset = dataset.subset(spec.subset)
    return dataset

