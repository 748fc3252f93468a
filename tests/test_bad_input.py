"""Image files as users have them: every Pillow mode, tiny images, corrupt, truncated and
non-image files, a dataset with one class; each handled or named, with real files."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from attnssl.cli import main
from attnssl.data.datasets import BadImageError, DatasetSpec, ImageFolderDataset, load_dataset

SIZE = 16


def save_modes(folder):
    """One file per mode; returns the RGB value each must decode to at its top-left pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    Image.new("L", (SIZE, SIZE), 100).save(folder / "gray.png")
    expected["gray.png"] = (100, 100, 100)
    rgba = Image.new("RGBA", (SIZE, SIZE), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (90, 90, 90, 0))  # fully transparent: composited over black
    rgba.save(folder / "rgba.png")
    expected["rgba.png"] = (0, 0, 0)
    sixteen = Image.fromarray(np.full((SIZE, SIZE), 32896, dtype=np.uint16))  # 128 * 257
    sixteen.save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    expected["sixteen.png"] = (128, 128, 128)
    palette = Image.new("P", (SIZE, SIZE), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    expected["palette.png"] = (10, 200, 30)
    Image.new("RGB", (3, 5), (7, 70, 170)).save(folder / "tiny.png")  # smaller than the crop
    expected["tiny.png"] = (7, 70, 170)
    Image.new("CMYK", (SIZE, SIZE), (0, 0, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    expected["cmyk.jpg"] = (255, 255, 255)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return expected


def test_every_image_mode_decodes_to_8_bit_rgb_of_the_crop_size(tmp_path):
    expected = save_modes(tmp_path / "flat")
    dataset = ImageFolderDataset(tmp_path / "flat", SIZE)
    assert sorted(p.name for p, _ in dataset.samples) == sorted(expected)
    for index, (path, _) in enumerate(dataset.samples):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE), path.name
        assert label == -1
        got = tuple(image[:, 0, 0].tolist())
        assert np.allclose(got, expected[path.name], atol=2), (path.name, got)


def write_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(folder / "good.png")
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")


@pytest.mark.parametrize("name", ["noise.png", "truncated.jpg", "empty.png"])
def test_an_unreadable_image_is_named_with_what_to_do(tmp_path, name):
    write_bad_files(tmp_path / "flat")
    dataset = ImageFolderDataset(tmp_path / "flat", SIZE)
    index = [p.name for p, _ in dataset.samples].index(name)
    with pytest.raises(BadImageError, match=f"{tmp_path / 'flat' / name} cannot be decoded"):
        dataset[index]
    with pytest.raises(BadImageError, match="data.skip_bad_images=true"):
        dataset[index]


def test_skip_bad_images_leaves_them_out_and_lists_them(tmp_path, capsys):
    write_bad_files(tmp_path / "flat")
    dataset = ImageFolderDataset(tmp_path / "flat", SIZE, skip_bad_images=True)
    assert [p.name for p, _ in dataset.samples] == ["good.png"]
    err = capsys.readouterr().err
    for name in ("noise.png", "truncated.jpg", "empty.png"):
        assert f"leaving out {tmp_path / 'flat' / name}" in err


def imagefolder_run(tmp_path, root, *extra):
    return main(["pretrain", "-c", "simclr_synthetic", "data.dataset=imagefolder",
                 f"data.root={root}", "data.image_size=16", "model.patch_size=4",
                 f"run.out_dir={tmp_path / 'runs'}", "run.name=r", "optim.batch_size=4",
                 "optim.epochs=1", "trainer.progress_bar=false", "views.local_crops=0", *extra])


def labelled_folder(root, classes, bad: bool = False):
    for split in ("train", "test"):
        for c, cls in enumerate(classes):
            save_modes(root / split / cls)
            if bad and split == "train" and c == 0:
                write_bad_files(root / split / cls)


def test_a_run_over_a_folder_with_a_corrupt_file_stops_naming_it_or_skips_it(tmp_path, capsys):
    labelled_folder(tmp_path / "data", ["a", "b"], bad=True)
    assert imagefolder_run(tmp_path, tmp_path / "data", "eval.at_end=false") == 2
    assert "cannot be decoded as an image" in capsys.readouterr().err
    assert imagefolder_run(tmp_path, tmp_path / "data", "data.skip_bad_images=true",
                           "run.name=skipping", "eval.knn_k=3", "eval.linear_epochs=2") == 0
    assert "k-NN top-1" in capsys.readouterr().out


def test_one_class_is_refused_for_the_linear_probe_before_training(tmp_path, capsys):
    labelled_folder(tmp_path / "data", ["only"])
    assert imagefolder_run(tmp_path, tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert "the linear probe needs at least 2 classes" in err and "has 1" in err
    assert not list((tmp_path / "runs").glob("*/checkpoints/*"))
    assert imagefolder_run(tmp_path, tmp_path / "data", "eval.linear_probe=false",
                           "eval.knn_k=3") == 0


def test_unlabelled_folder_trains_but_is_refused_for_evaluation(tmp_path, capsys):
    save_modes(tmp_path / "flat")
    assert imagefolder_run(tmp_path, tmp_path / "flat") == 2
    assert "has no 'test' split" in capsys.readouterr().err
    spec = DatasetSpec("imagefolder", root=str(tmp_path / "flat"), image_size=SIZE)
    assert len(load_dataset(spec, "train")) == 6
    assert imagefolder_run(tmp_path, tmp_path / "flat", "eval.at_end=false") == 0
