"""Each dataset read from files written here in the dataset's own format."""

import gzip
import math
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from attnssl.config import ConfigError, load_config
from attnssl.data.datasets import (
    DatasetNotFoundError,
    DatasetSpec,
    load_dataset,
    make_synthetic,
)


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (7,), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress)
    ds = load_dataset(DatasetSpec("fashion-mnist", root=str(tmp_path)), "test")
    assert len(ds) == 7 and ds.channels == 1 and ds.image_size == 28 and ds.num_classes == 10
    x, y = ds.get_batch(torch.tensor([3, 5]))
    assert torch.equal(x[:, 0], torch.from_numpy(images[[3, 5]]))
    assert y.tolist() == labels[[3, 5]].tolist()


def test_fashion_mnist_truncated_file_is_named(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)), False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((4,)), False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*promises"):
        load_dataset(DatasetSpec("fashion-mnist", root=str(tmp_path)), "train")


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DatasetSpec("fashion-mnist", root=str(tmp_path)), "train")
    message = str(err.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message


def write_cifar(root, name: str, per_file: int = 4):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, meta, names_key, classes = b"labels", "batches.meta", b"label_names", 10
    else:
        base = root / "cifar-100-python"
        files = ["train", "test"]
        label_key, meta, names_key, classes = b"fine_labels", "meta", b"fine_label_names", 100
    base.mkdir(parents=True)
    written = {}
    for f in files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, per_file).tolist()
        with open(base / f, "wb") as handle:
            pickle.dump({b"data": data, label_key: labels}, handle, protocol=2)
        written[f] = (data, labels)
    with open(base / meta, "wb") as handle:
        pickle.dump({names_key: [f"class{i}".encode() for i in range(classes)]}, handle)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_python_pickles(tmp_path, name):
    written = write_cifar(tmp_path, name)
    train = load_dataset(DatasetSpec(name, root=str(tmp_path)), "train")
    test = load_dataset(DatasetSpec(name, root=str(tmp_path)), "test")
    first_train = "data_batch_1" if name == "cifar10" else "train"
    assert len(train) == (20 if name == "cifar10" else 4) and len(test) == 4
    data, labels = written[first_train]
    x, y = train.get_batch(torch.tensor([2]))
    assert torch.equal(x[0], torch.from_numpy(data[2].reshape(3, 32, 32)))
    assert y.item() == labels[2]
    assert train.num_classes == (10 if name == "cifar10" else 100)


class _Exploit:
    def __reduce__(self):
        return (exec, ("raise SystemExit('payload ran')",))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    write_cifar(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.exec"):
        load_dataset(DatasetSpec("cifar10", root=str(tmp_path)), "test")


def test_stl10_reads_column_major_binaries(tmp_path):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
    # the files store each channel column-major: (N, C, W, H) in memory
    images.transpose(0, 1, 3, 2).tofile(base / "test_X.bin")
    np.array([1, 10, 4], dtype=np.uint8).tofile(base / "test_y.bin")
    ds = load_dataset(DatasetSpec("stl10", root=str(tmp_path)), "test")
    x, y = ds.get_batch(torch.arange(3))
    assert torch.equal(x, torch.from_numpy(images))
    assert y.tolist() == [0, 9, 3]


def test_imagefolder_labelled_with_splits_and_unlabelled(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / "labelled" / split / cls
            folder.mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (40 + k, 30), colour).save(folder / f"{k}.png")
    train = load_dataset(DatasetSpec("imagefolder", root=str(tmp_path / "labelled"),
                                     image_size=16), "train")
    test = load_dataset(DatasetSpec("imagefolder", root=str(tmp_path / "labelled"),
                                    image_size=16), "test")
    assert len(train) == 6 and len(test) == 4 and train.classes == ("cat", "dog")
    x, y = train.get_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    assert x[0, 0].float().mean() > 250 and x[1, 2].float().mean() > 250  # red cat, blue dog

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (20, 20), 128).save(flat / "a.png")
    (flat / "notes.txt").write_text("not an image")
    unlabelled = load_dataset(DatasetSpec("imagefolder", root=str(flat), image_size=8), "train")
    assert len(unlabelled) == 1 and not unlabelled.has_labels
    assert unlabelled[0][0].shape == (3, 8, 8) and unlabelled[0][1] == -1
    with pytest.raises(DatasetNotFoundError, match="no 'test' split"):
        load_dataset(DatasetSpec("imagefolder", root=str(flat), image_size=8), "test")


def test_empty_imagefolder_is_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"no images .* in {tmp_path}"):
        load_dataset(DatasetSpec("imagefolder", root=str(tmp_path), image_size=8), "train")


def test_synthetic_masks_mark_the_shape_with_its_class():
    images, labels, masks = make_synthetic(64, 32, seed=0)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert len(labels.unique()) == 8
    for n in range(64):
        values = masks[n].unique().tolist()
        assert values == [0, labels[n].item() + 1]  # background and this image's class
        area = (masks[n] > 0).float().mean().item()
        assert 0.02 < area < 0.6
        # the shape has its own colour: inside and outside differ on average
        inside = images[n][:, masks[n] > 0].float().mean(1)
        outside = images[n][:, masks[n] == 0].float().mean(1)
        assert (inside - outside).abs().max() > 20
    again = make_synthetic(64, 32, seed=0)
    assert torch.equal(again[0], images)


def test_synthetic_splits_differ_and_subset_applies():
    train = load_dataset(DatasetSpec("synthetic", synthetic_size=40, subset=10), "train")
    test = load_dataset(DatasetSpec("synthetic", synthetic_size=40), "test")
    assert len(train) == 10 and len(test) == 10
    assert not torch.equal(train.images, test.images)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="splits 'train' and 'test', not 'val'"):
        load_dataset(DatasetSpec("synthetic"), "val")


@pytest.mark.integration
def test_loader_workers_that_persist_across_epochs_give_the_main_process_batches(tmp_path):
    """An image folder read by two persistent workers over three epochs (and into a resumed
    run) trains to exactly the weights of the same run read in the main process."""
    from attnssl.cli import main
    from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(24):
            pixels = (rng.random((20, 20, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    common = ["pretrain", "-c", "simclr_synthetic", "data.dataset=imagefolder",
              f"data.root={tmp_path / 'images'}", "data.image_size=16", "optim.batch_size=16",
              "optim.epochs=3", "trainer.progress_bar=false", "trainer.num_threads=1",
              "eval.at_end=false", f"run.out_dir={tmp_path}"]
    assert main([*common, "run.name=main-process"]) == 0
    assert main([*common, "run.name=workers", "data.num_workers=2", "trainer.max_steps=4"]) == 0
    assert main(["pretrain", "--resume", str(tmp_path / "workers"), "trainer.max_steps=null"]) == 0
    final = {run: safe_torch_load(list_checkpoints(tmp_path / run)[-1]) for run in
             ("main-process", "workers")}
    assert final["workers"]["train"]["step"] == final["main-process"]["train"]["step"] == 9
    for key, value in final["main-process"]["method"].items():
        assert torch.equal(value, final["workers"]["method"][key]), key


def test_imbalance_images_are_a_shared_grating_over_a_class_shape():
    from attnssl.data.datasets import make_imbalance

    images, labels, masks, (grating_amp, shape_amp) = make_imbalance(64, 28, imbalance=3.0)
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(masks.amax((1, 2)), labels + 1)  # one shape of the image's class
    assert torch.all((grating_amp >= 1.5) & (grating_amp <= 3.0))  # imbalance * U[0.5, 1]
    assert torch.all((shape_amp >= 0.5) & (shape_amp <= 1.0))
    # undo the mapping to [0, 1]; off the shape, a least-squares fit of the grating (period
    # half the side, at 30 degrees) recovers each image's amplitude
    value = images[:, 0].double() / 255 * (2 * 3.0 + 1) - 3.0
    yy, xx = torch.meshgrid(torch.arange(28) + 0.5, torch.arange(28) + 0.5, indexing="ij")
    t = 2 * math.pi * (xx * math.cos(math.pi / 6) + yy * math.sin(math.pi / 6)) / 14
    basis = torch.stack([t.cos(), t.sin()], -1).double()
    for n in range(64):
        off = masks[n] == 0
        coef = torch.linalg.lstsq(basis[off], value[n][off].unsqueeze(1)).solution
        assert coef.norm().item() == pytest.approx(grating_amp[n].item(), abs=0.05)
        on = value[n][~off] - (basis[~off] @ coef).squeeze(1)  # the shape, over the grating
        assert on.mean().item() == pytest.approx(shape_amp[n].item(), abs=0.1)
    plain, _, plain_masks, _ = make_imbalance(8, 28, imbalance=0.0)
    shape_pixels = plain[:, 0][plain_masks > 0].double() / 255
    assert shape_pixels.mean() > 0.45 and plain[:, 0][plain_masks == 0].double().mean() / 255 < 0.05


def test_imbalance_dataset_loads_by_name_with_its_strength():
    config = load_config("mae_fashion_mnist", ["data.dataset=imbalance", "data.synthetic_size=60",
                                               "data.synthetic_imbalance=2"])
    from attnssl.eval.evaluate import load_eval_splits

    train, test = load_eval_splits(config)
    assert (len(train), len(test), train.channels, train.image_size) == (60, 10, 1, 28)
    assert train.num_classes == 8 and train.masks is not None
    with pytest.raises(ConfigError, match="synthetic_imbalance"):
        load_config("mae_fashion_mnist", ["data.synthetic_imbalance=-1"])
