"""What a trial as a demanding new user broke, case by case: each test is named after its case
and failed before its fix."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from attnssl.cli import main
from attnssl.config import ConfigError, load_config
from attnssl.data.datasets import DatasetSpec, load_dataset
from attnssl.runs.checkpoint import list_checkpoints
from attnssl.runs.folder import RunFolderLock, new_run_folder

pytestmark = pytest.mark.integration

TINY = ["data.synthetic_size=64", "optim.batch_size=32", "optim.epochs=1", "model.depth=1",
        "trainer.progress_bar=false", "trainer.num_threads=1", "eval.at_end=false"]


def pretrain_args(out: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", "-c", "simclr_synthetic", f"run.out_dir={out}", f"run.name={name}",
            *TINY, *extra]


def _image_folder(root: Path, split: str, classes: dict[str, int]) -> None:
    for name, level in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), level + i).save(folder / f"{i}.png")


# ------------------------------------------------ 1. silently wrong scores


def test_case_test_split_with_a_subset_of_train_classes_keeps_train_numbering(tmp_path):
    _image_folder(tmp_path, "train", {"ankle": 0, "bag": 100, "coat": 200})
    _image_folder(tmp_path, "test", {"bag": 100, "coat": 200})  # a subset: two of three
    spec = DatasetSpec("imagefolder", str(tmp_path), image_size=8)
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    assert test.classes == train.classes == ("ankle", "bag", "coat")
    labels = {path.parent.name: label for path, label in test.samples}
    assert labels == {"bag": 1, "coat": 2}  # as in train, not 0 and 1


def test_case_test_split_with_a_class_train_lacks_is_refused_by_name(tmp_path):
    _image_folder(tmp_path, "train", {"bag": 100, "coat": 200})
    _image_folder(tmp_path, "test", {"bag": 100, "dress": 50})
    with pytest.raises(ValueError, match="class folders the training split lacks: dress"):
        load_dataset(DatasetSpec("imagefolder", str(tmp_path), image_size=8), "test")


# ------------------------------------------------ 2. lost work


def test_case_second_run_into_a_folder_in_use_stops_naming_the_holder(tmp_path, capsys):
    child = subprocess.Popen(
        [sys.executable, "-m", "attnssl", *pretrain_args(tmp_path, "shared", "optim.epochs=50")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "shared" / ".lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            assert time.time() < deadline and child.poll() is None
            time.sleep(0.1)
        assert main(pretrain_args(tmp_path, "shared")) == 2
        err = capsys.readouterr().err
        assert "run folder" in err and f"in use by process {child.pid}" in err
    finally:
        child.kill()
        child.wait()
    # the holder is gone (killed): the lock is free again
    with RunFolderLock(tmp_path / "shared"):
        pass


def test_case_run_name_cannot_escape_the_run_root(tmp_path):
    for name in ("../../x", "a/b", ".", "..", ".hidden"):
        with pytest.raises(ConfigError, match="run.name.*one folder name under run.out_dir"):
            load_config("simclr_synthetic", [f"run.name={name}"])
    assert main(pretrain_args(tmp_path / "root", "../escaped")) == 2
    assert not (tmp_path / "escaped").exists()


def test_case_automatic_run_names_started_in_one_second_do_not_collide(tmp_path):
    folders = {new_run_folder(tmp_path, "simclr-synthetic") for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() for f in folders)


def test_case_evaluating_twice_keeps_both_results_and_loose_checkpoints_resume_elsewhere(
        tmp_path, capsys):
    assert main(pretrain_args(tmp_path, "r", "trainer.max_steps=1")) == 0
    run = tmp_path / "r"
    for _ in range(2):
        assert main(["eval", str(run), "eval.linear_probe=false", "eval.knn_k=5"]) == 0
    results = sorted(run.glob("eval-step-*.json"))
    assert [p.name for p in results] == ["eval-step-00000001-2.json", "eval-step-00000001.json"]
    assert all(json.loads(p.read_text())["knn_top1"] >= 0 for p in results)

    # a checkpoint copied out of its run folder: resuming it writes nothing beside its parent
    loose = tmp_path / "kept" / "deep"
    loose.mkdir(parents=True)
    shutil.copy(list_checkpoints(run)[-1], loose / "file.ckpt")
    before = set((tmp_path / "kept").rglob("*"))
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(loose / "file.ckpt")]) == 0
    assert set((tmp_path / "kept").rglob("*")) == before
    out = capsys.readouterr().out
    assert "is not inside a run folder's checkpoints/" in out
    new_folder = Path(out.split("the run continues in ")[1].split()[0])
    assert new_folder.parent == tmp_path and list_checkpoints(new_folder)


# ------------------------------------------------ 4. raw tracebacks


def test_case_macos_appledouble_files_are_not_read_as_images(tmp_path):
    _image_folder(tmp_path, "train", {"bag": 100})
    (tmp_path / "train" / "bag" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    data = load_dataset(DatasetSpec("imagefolder", str(tmp_path), image_size=8), "train")
    assert len(data) == 3 and data.get_batch(torch.arange(3))[0].shape == (3, 3, 8, 8)


# ------------------------------------------------ 8. smaller


def test_case_checkpoints_are_created_with_the_usual_file_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(pretrain_args(tmp_path, "m", "trainer.max_steps=1")) == 0
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(list_checkpoints(tmp_path / "m")[-1].stat().st_mode)
    assert mode == 0o644


def test_case_yaml_with_a_tab_is_named_with_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n\tlr: 0.001\n")
    assert main(["pretrain", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not valid YAML at line 2" in err and "tabs" in err


def test_case_garbage_checkpoint_on_resume_is_named(tmp_path, capsys):
    garbage = tmp_path / "old.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    assert main(["pretrain", "--resume", str(garbage)]) == 2
    assert f"{garbage} is not a readable checkpoint" in capsys.readouterr().err


def test_case_crafted_cifar_file_is_refused_with_its_path(tmp_path):
    import pickle

    from attnssl.data.datasets import _load_pickle

    class Payload:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('ran')",))

    crafted = tmp_path / "data_batch_1"
    crafted.write_bytes(pickle.dumps({"data": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match=f"{crafted}: refusing to load builtins.exec"):
        _load_pickle(crafted)
    assert not Path("PWNED").exists()


def test_case_decompression_bomb_is_named_and_skippable(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    _image_folder(tmp_path, "train", {"bag": 100})
    PILImage.new("L", (64, 64), 30).save(tmp_path / "train" / "bag" / "huge.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is over twice the limit
    spec = DatasetSpec("imagefolder", str(tmp_path), image_size=8)
    data = load_dataset(spec, "train")
    with pytest.raises(Exception, match="huge.png cannot be decoded as an image: it has more "
                                        "pixels than Pillow's limit"):
        data.get_batch(torch.arange(len(data)))
    skipped = load_dataset(DatasetSpec("imagefolder", str(tmp_path), image_size=8,
                                       skip_bad_images=True), "train")
    assert len(skipped) == 3


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.devices=banana", "trainer.devices: must be a positive number of devices"),
    ("optim.batch_size=true", "batch_size must be a number, not the boolean True"),
    ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
])
def test_case_values_that_would_train_wrongly_are_refused(tmp_path, capsys, override, message):
    assert main(pretrain_args(tmp_path, "v", override)) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path).rglob("*.ckpt"))


def test_case_simclr_with_batch_one_is_refused(tmp_path, capsys):
    assert main(pretrain_args(tmp_path, "b", "optim.batch_size=1")) == 2
    assert "optim.batch_size must be at least 2, got 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_case_cuda_accelerator_without_a_gpu_is_named(tmp_path, capsys):
    assert main(pretrain_args(tmp_path, "c", "trainer.accelerator=cuda")) == 2
    assert "trainer.accelerator=cuda, but this machine has no such device" in \
        capsys.readouterr().err


# ------------------------------------------------ 6. stops that lose steps


@pytest.mark.parametrize(("signal_name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_case_sigterm_and_sigint_save_a_checkpoint_and_print_the_resume(tmp_path, signal_name,
                                                                        code):
    import signal

    args = pretrain_args(tmp_path, "s", "optim.epochs=40", "trainer.checkpoint_every_steps=1000",
                         "trainer.log_every_steps=1")
    child = subprocess.Popen([sys.executable, "-m", "attnssl", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "s" / "metrics.csv"
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) > 3):
        assert time.time() < deadline and child.poll() is None
        time.sleep(0.05)
    child.send_signal(getattr(signal, signal_name))
    out, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    assert "Traceback" not in err
    assert f"stopped by {signal_name} at step" in out
    step = int(out.split(f"stopped by {signal_name} at step ")[1].split(",")[0])
    assert step < 80 and f"continue with: attnssl pretrain --resume {tmp_path / 's'}" in out
    assert list_checkpoints(tmp_path / "s")[-1].name == f"step-{step:08d}.ckpt"


def test_case_continue_command_after_max_steps_finishes_the_run(tmp_path, capsys):
    assert main(pretrain_args(tmp_path, "m", "trainer.max_steps=1")) == 0
    out = capsys.readouterr().out
    command = out.split("continue to the end with: attnssl ")[1].split()
    assert command == ["pretrain", "--resume", str(tmp_path / "m"), "trainer.max_steps=null"]
    assert main(command) == 0
    assert "steps 2/2" in capsys.readouterr().out


def test_case_bad_image_met_mid_run_names_the_checkpoint_to_resume_from(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        Image.new("L", (16, 16), 5 * i).save(folder / f"{i:02d}.png")
    (folder / "39.png").write_bytes(b"not a png")
    from attnssl.data.loader import epoch_batches

    def step_meeting_it(seed: int) -> int:  # the batch that holds image 39 (files are sorted)
        batches = epoch_batches(40, 8, 0, seed, 0, 1)
        return next(i for i, b in enumerate(batches) if 39 in b.tolist())

    seed = next(s for s in range(20) if step_meeting_it(s) >= 2)  # after two saved steps
    args = ["pretrain", "-c", "simclr_synthetic", f"run.out_dir={tmp_path}", "run.name=bad",
            f"run.seed={seed}",
            "data.dataset=imagefolder", f"data.root={folder}", "data.image_size=16",
            "optim.batch_size=8", "optim.epochs=1", "model.depth=1", "trainer.progress_bar=false",
            "trainer.num_threads=1", "trainer.checkpoint_every_steps=1", "eval.at_end=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "39.png cannot be decoded as an image" in err
    step = step_meeting_it(seed)
    assert f"stopped at step {step}; last checkpoint: {tmp_path / 'bad'}/checkpoints/" \
           f"step-{step:08d}.ckpt" in err
    assert f"continue with: attnssl pretrain --resume {tmp_path / 'bad'}" in err


# ------------------------------------------------ 3. resume promises


def test_case_resume_with_another_thread_count_says_it_is_not_bit_exact(tmp_path):
    import warnings

    assert main(pretrain_args(tmp_path, "t", "optim.epochs=3", "trainer.max_steps=1")) == 0
    with warnings.catch_warnings(record=True) as same:
        warnings.simplefilter("always")
        assert main(["pretrain", "--resume", str(tmp_path / "t"), "trainer.num_threads=1"]) == 0
    assert not [w for w in same if "last bits" in str(w.message)]
    with pytest.warns(RuntimeWarning, match=r"resuming with 2 threads \(the checkpoint was "
                                            r"written with 1\).*only to the last bits"):
        assert main(["pretrain", "--resume", str(tmp_path / "t"), "trainer.num_threads=2"]) == 0


# ------------------------------------------------ 7. pictures that mislead


def test_case_report_figures_carry_one_colour_scale_legends_and_the_floor(tmp_path, capsys):
    from matplotlib.colorbar import Colorbar  # noqa: F401 - the figure's colour bar class

    from attnssl.report import class_token_attention_figure, layer_metrics_figure

    assert main(["pretrain", "-c", "dino_synthetic", f"run.out_dir={tmp_path}", "run.name=r",
                 "data.synthetic_size=64", "optim.batch_size=32", "optim.epochs=1",
                 "trainer.progress_bar=false", "trainer.num_threads=1",
                 "eval.linear_probe=false", "eval.knn_k=5"]) == 0
    assert main(["analyze", str(tmp_path / "r"), "--images", "8"]) == 0
    result = json.loads((tmp_path / "r" / "analysis.json").read_text())
    # the untrained backbone's values sit beside the trained ones
    assert set(result["untrained"]["per_layer"]) >= {"entropy", "cls_entropy", "distance"}
    figure = layer_metrics_figure(result)
    for axis in figure.axes:
        labels = [t.get_text() for t in axis.get_legend().get_texts()]
        assert {"one head", "mean over heads", "untrained backbone"} <= set(labels)
        assert not axis.yaxis.get_major_formatter().get_useOffset()
    entropy_axis = figure.axes[0]
    assert "uniform attention" in [t.get_text() for t in entropy_axis.get_legend().get_texts()]

    # class-token maps: one scale for the whole figure, from 0, with a colour bar at 1/P marked
    cls = torch.softmax(torch.randn(2, 2, 16), dim=-1)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    figure = class_token_attention_figure(images, cls, [4, 4])
    maps = [im for axis in figure.axes for im in axis.get_images() if im.get_cmap().name == "inferno"]
    assert len(maps) == 2 * 3 and {im.get_clim() for im in maps} == {(0.0, float(cls.max()))}
    bars = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "uniform 1/16" in bars[0].get_ylabel()

    # the report's evaluation table has the random-init floor, and a uniform map is said so
    report = (tmp_path / "r" / "report.html").read_text()
    assert "random-init floor" in report
    uniform = dict(result, per_layer={**result["per_layer"],
                                      "cls_entropy": [result["uniform_entropy"]] * 2})
    from attnssl.analysis import uniform_layers_sentence

    assert "layers 1, 2 is indistinguishable from uniform" in uniform_layers_sentence(uniform)


# ------------------------------------------------ 8. smaller


def test_case_presets_are_listed_with_what_each_is(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("bam_fashion_mnist ") and "BAM" in line for line in lines)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every name has a line


def test_case_skip_bad_images_lists_each_bad_file_once(tmp_path, capsys):
    _image_folder(tmp_path, "train", {"bag": 100, "coat": 200})
    _image_folder(tmp_path, "test", {"bag": 100, "coat": 200})
    (tmp_path / "train" / "bag" / "broken.png").write_bytes(b"broken")
    args = ["pretrain", "-c", "simclr_synthetic", f"run.out_dir={tmp_path / 'runs'}",
            "run.name=s", "data.dataset=imagefolder", f"data.root={tmp_path}",
            "data.image_size=8", "data.skip_bad_images=true", "model.patch_size=4",
            "optim.batch_size=2", "optim.epochs=1", "model.depth=1",
            "trainer.progress_bar=false", "eval.linear_probe=false", "eval.knn_k=2"]
    assert main(args) == 0
    assert capsys.readouterr().err.count("leaving out") == 1


def test_case_relative_data_root_from_another_folder_suggests_an_absolute_one(tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "-c", "bam_fashion_mnist", "data.root=data/fmnist"]) == 2
    err = capsys.readouterr().err
    assert "is a relative path" in err and f"--data-root {tmp_path / 'data' / 'fmnist'}" in err
