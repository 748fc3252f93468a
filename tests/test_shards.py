"""Sharded datasets (litdata): ``attnssl shard`` writes a folder of JPEG and PNG files with a
corrupt one among them, names the file it skipped, and ``data.dataset=shards`` reads the same
pixels back by index; a two-process run from the shards, killed once a checkpoint exists and
resumed, ends with the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attnssl.cli import main
from attnssl.data.datasets import DatasetSpec, decode_image, load_dataset
from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load

SIZE = 32


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/{disc,square}/ and test/disc/: JPEG and PNG files of several sizes and modes, and
    one corrupt JPEG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, classes, count in (("train", ("disc", "square"), 40), ("test", ("disc",), 6)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((30 + i % 7, 40, 3)) * 255 * (label + 1) / 2).astype("uint8")
                image = Image.fromarray(pixels)
                if i % 3 == 0:
                    image = image.convert("L")
                image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "train" / "square" / "broken.jpg").write_bytes(b"\xff\xd8 truncated, not a JPEG")
    return root


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("shards") / "set"
    assert main(["shard", str(image_folder), str(dst), "--image-size", str(SIZE),
                 "--chunk-mb", "1"]) == 0
    return dst


def test_shard_names_the_file_it_skipped_and_stores_the_decoded_pixels(image_folder, tmp_path,
                                                                       capsys):
    dst = tmp_path / "s"
    assert main(["shard", str(image_folder), str(dst), "--image-size", str(SIZE),
                 "--chunk-mb", "1"]) == 0
    captured = capsys.readouterr()
    assert f"skipped {image_folder / 'train' / 'square' / 'broken.jpg'}" in captured.err
    assert "train 80, test 6 images" in captured.out
    train = load_dataset(DatasetSpec("shards", root=str(dst)), "train")
    assert len(train) == 80 and train.classes == ("disc", "square") and train.image_size == SIZE
    files = sorted((image_folder / "train" / "disc").iterdir()) + sorted(
        p for p in (image_folder / "train" / "square").iterdir() if p.name != "broken.jpg")
    for index in (0, 7, 39, 40, 79):  # in the folder's order, labels by class folder
        image, label = train[index]
        assert torch.equal(image, decode_image(files[index], SIZE)), index
        assert label == (index >= 40)
    images, labels = train.get_batch(torch.tensor([79, 0, 41]))
    assert images.shape == (3, 3, SIZE, SIZE) and labels.tolist() == [1, 0, 1]
    assert len(load_dataset(DatasetSpec("shards", root=str(dst)), "test")) == 6
    # a second write into the same folder is refused, naming it
    assert main(["shard", str(image_folder), str(dst)]) == 2
    assert f"{dst} is not empty" in capsys.readouterr().err


def test_shards_refuse_another_image_size_and_a_missing_folder_by_name(shards, tmp_path):
    with pytest.raises(ValueError, match=r"data.image_size=64, but the shards .* hold 32 px"):
        load_dataset(DatasetSpec("shards", root=str(shards), image_size=64), "train")
    with pytest.raises(FileNotFoundError, match=r"shards.json is missing; write shards with"):
        load_dataset(DatasetSpec("shards", root=str(tmp_path)), "train")


RUN = ["-c", "simclr_synthetic", "data.dataset=shards", "optim.batch_size=16",
       "optim.epochs=2", "trainer.checkpoint_every_steps=2", "trainer.progress_bar=false",
       "trainer.num_threads=1", "trainer.accelerator=cpu", "trainer.devices=2",
       "data.num_workers=1", "eval.at_end=false"]


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "attnssl", "pretrain", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final(run: Path) -> dict:
    return safe_torch_load(list_checkpoints(run)[-1])["method"]


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_on_shards_killed_and_resumed_end_as_an_uninterrupted_run(shards,
                                                                                 tmp_path):
    common = [*RUN, f"data.root={shards}", f"run.out_dir={tmp_path}"]
    straight = _cli(*common, "run.name=straight")
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]

    killed = _cli(*common, "run.name=killed")
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while not list_checkpoints(run) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it was killed"
    started = subprocess.run(["ps", "-o", "pid=", "--ppid", str(killed.pid)],
                             capture_output=True, text=True).stdout.split()
    for pid in [killed.pid, *map(int, started)]:  # both processes, at once
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    steps = safe_torch_load(list_checkpoints(run)[-1])["train"]["step"]
    assert 0 < steps < 10  # 80 images, 16 a step over 2 epochs: 10 steps in all
    resumed = _cli("--resume", str(run))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    a, b = _final(tmp_path / "straight"), _final(run)
    assert safe_torch_load(list_checkpoints(run)[-1])["train"]["step"] == 10
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
