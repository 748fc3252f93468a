"""Faults a long run meets, with real processes and files: kills at any moment (during a save
too), a damaged checkpoint, a full disk, an unwritable folder, a non-finite loss, a process of a
multi-process run dying; and the exported backbone loading in timm and starting another run."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnssl.cli import main
from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # kills, faults, processes

TINY = [
    "data.synthetic_size=256", "optim.batch_size=32", "optim.epochs=2",
    "trainer.checkpoint_every_steps=3", "trainer.progress_bar=false", "trainer.num_threads=1",
    "eval.at_end=false",
]
PRESET = ["-c", "simclr_synthetic"]


def command(out: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", *PRESET, f"run.out_dir={out}", f"run.name={name}", *TINY, *extra]


def subprocess_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "attnssl", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def final_state(run: Path) -> dict:
    return safe_torch_load(list_checkpoints(run)[-1])["method"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run every faulted run must end equal to (16 steps)."""
    out = tmp_path_factory.mktemp("straight")
    assert main(command(out, "straight")) == 0
    return final_state(out / "straight")


def _temporaries(folder: Path) -> set[str]:
    return {p.name for p in folder.glob(".*.tmp")} if folder.is_dir() else set()


def test_kills_at_random_moments_and_during_saves_resume_to_the_same_weights(tmp_path,
                                                                              straight):
    """SIGKILL the run again and again: twice just as a checkpoint is being written (a new
    temporary file exists), twice at a random moment of a step (after a new checkpoint has
    appeared); resume (or restart, while none exists) each time."""
    run, folder = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    args = command(tmp_path, "killed", "trainer.checkpoint_every_steps=1")
    rng = random.Random(0)
    plan = ["save", "step", "save", "step"]
    while plan:
        proc = subprocess_cli(["pretrain", "--resume", str(run)] if list_checkpoints(run)
                              else args)
        stale, seen = _temporaries(folder), set(list_checkpoints(run))
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if plan[0] == "save" and _temporaries(folder) - stale:
                break
            if plan[0] == "step" and set(list_checkpoints(run)) - seen:
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
        if plan.pop(0) == "save":  # the half-written file is still there: killed mid-save
            assert _temporaries(folder) - stale, "the kill missed the save"
    finish = ["pretrain", "--resume", str(run)] if list_checkpoints(run) else args
    assert main(finish) == 0
    assert list_checkpoints(run)[-1].name == "step-00000016.ckpt"
    assert not _temporaries(folder)
    assert_same_weights(straight, final_state(run))


def test_resume_auto_continues_the_same_command_and_refuses_other_settings(tmp_path, straight,
                                                                           capsys):
    args = command(tmp_path, "auto", "run.resume=auto", "trainer.max_steps=6")
    assert main(args) == 0
    assert list_checkpoints(tmp_path / "auto")[-1].name == "step-00000006.ckpt"
    newest = list_checkpoints(tmp_path / "auto")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged after it was written
    assert main(args) == 0  # passes over step 6, continues from step 3 to step 9
    assert capsys.readouterr().err.count("passing over unreadable checkpoint") == 1
    newest = list_checkpoints(tmp_path / "auto")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["pretrain", "--resume", str(tmp_path / "auto")]) == 0  # the folder: from step 6
    assert capsys.readouterr().err.count("passing over unreadable checkpoint") == 1
    assert main(args) == 0
    assert_same_weights(straight, final_state(tmp_path / "auto"))
    assert main([*args, "optim.lr=0.5"]) == 2
    assert "trained with other settings: optim.lr (trained 0.001, asked 0.5)" in capsys.readouterr().err
    assert main(command(tmp_path, "fresh", "run.resume=auto", "trainer.max_steps=2")) == 0


def test_a_run_folder_moved_elsewhere_continues_there(tmp_path, straight):
    """A half-trained run folder moved to another place (a sweep's points moved into a new
    ``--out``) continues in its new place under ``run.resume=auto``: where the folder lives is
    not a training setting. Other settings are still refused."""
    import shutil

    before, after = tmp_path / "before", tmp_path / "after"
    assert main(command(before, "moved", "run.resume=auto", "trainer.max_steps=6")) == 0
    after.mkdir()
    shutil.move(str(before / "moved"), after / "moved")
    assert main(command(after, "moved", "run.resume=auto")) == 0
    assert list_checkpoints(after / "moved")[-1].name == "step-00000016.ckpt"
    assert not (before / "moved").exists()
    assert_same_weights(straight, final_state(after / "moved"))
    # naming another place on --resume is still refused: the run writes where its folder is
    assert main(["pretrain", "--resume", str(after / "moved"), f"run.out_dir={before}"]) == 2


def test_non_finite_loss_stops_naming_the_step_and_last_checkpoint(tmp_path, capsys):
    # a huge learning rate sends the weights past float32 range: the loss is NaN at step 1
    blow_up = ["optim.lr=1e9", "optim.warmup_epochs=0", "optim.clip_grad=null",
               "trainer.checkpoint_every_steps=1"]
    assert main(command(tmp_path, "nan", *blow_up)) == 2
    err = capsys.readouterr().err
    checkpoint = tmp_path / "nan" / "checkpoints" / "step-00000001.ckpt"
    assert "the loss is not finite (nan on process 0) at step 1" in err and str(checkpoint) in err
    assert list_checkpoints(tmp_path / "nan") == [checkpoint]
    last_good = safe_torch_load(checkpoint)["method"]
    assert all(torch.isfinite(v).all() for v in last_good.values())
    # skipping instead: every later step is skipped and leaves no trace
    assert main(["pretrain", "--resume", str(tmp_path / "nan"),
                 "trainer.nonfinite_loss=skip"]) == 0
    metrics = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 15 and metrics["steps"] == 16
    assert_same_weights(last_good, final_state(tmp_path / "nan"))


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_stops_with_the_previous_checkpoint_intact(tmp_path, straight):
    """Writes past a file-size limit fail as on a full disk (EFBIG)."""
    run = tmp_path / "full"
    assert main(command(tmp_path, "full", "trainer.max_steps=3")) == 0
    before = list_checkpoints(run)[-1]
    before_bytes = before.read_bytes()
    proc = subprocess_cli(["pretrain", "--resume", str(run)], preexec_fn=_limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "could not write checkpoint" in err and f"The previous checkpoint ({before}) is intact" in err
    assert list_checkpoints(run) == [before] and before.read_bytes() == before_bytes
    assert not [p for p in (run / "checkpoints").iterdir() if p.suffix == ".tmp"]
    assert main(["pretrain", "--resume", str(run), "trainer.max_steps=null"]) == 0  # space is back
    assert_same_weights(straight, final_state(run))


def test_an_unwritable_run_folder_is_named(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["pretrain", *PRESET, f"run.out_dir={blocker}", "run.name=r", *TINY]) == 2
    assert f"cannot write the run folder {blocker / 'r'}" in capsys.readouterr().err


def test_a_dead_process_stops_the_other_with_a_clear_error(tmp_path):
    """Two real gloo processes; SIGKILL the one Fabric started once training runs."""
    args = command(tmp_path, "two", "trainer.accelerator=cpu", "trainer.devices=2",
                   "data.synthetic_size=2048", "optim.epochs=4", "trainer.checkpoint_every_steps=2",
                   "trainer.collective_timeout_s=60")
    proc = subprocess_cli(args)
    deadline = time.time() + 180
    while not list_checkpoints(tmp_path / "two") and time.time() < deadline:
        time.sleep(0.05)
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert children, "Fabric started no second process"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert time.time() - killed_at < 60
    assert "process 0 of 2 lost contact with the others" in err
    assert "continue with --resume" in err


def test_export_loads_in_timm_and_back_with_the_same_features(tmp_path, capsys):
    import timm

    from attnssl.eval.evaluate import load_trained_backbone
    from attnssl.export import load_exported

    assert main(command(tmp_path, "r", "trainer.max_steps=2")) == 0
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "export")]) == 0
    assert "local-dir:" in capsys.readouterr().out
    trained = load_trained_backbone(tmp_path / "r").backbone.eval()
    from_timm = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    ours = load_exported(tmp_path / "export").eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained.forward_features(images)
        torch.testing.assert_close(from_timm.forward_features(images), expected, rtol=0, atol=0)
        torch.testing.assert_close(ours.forward_features(images), expected, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json",
                                                                       "model.safetensors"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A 2-step SimCLR run's exported backbone (synthetic 32 px images, patch 8)."""
    out = tmp_path_factory.mktemp("exported")
    assert main(command(out, "r", "trainer.max_steps=2")) == 0
    assert main(["export", str(out / "r"), "--out", str(out / "export")]) == 0
    return out / "export"


def _pretrainer(tmp_path: Path, preset: str, *extra: str):
    from attnssl.config import load_config
    from attnssl.train.trainer import Pretrainer

    config = load_config(preset, [*TINY, f"run.out_dir={tmp_path}", "run.name=chained", *extra])
    trainer = Pretrainer(config, tmp_path / "chained")
    trainer.setup()
    return trainer


def test_pretraining_starts_from_an_export_and_resumes_without_it(tmp_path, exported):
    """DINO chained on a SimCLR backbone: student and EMA teacher both start from the export's
    weights; a resumed run reads its checkpoint, not the export (which may be gone)."""
    from safetensors.torch import load_file

    weights = load_file(str(exported / "model.safetensors"))
    method = _pretrainer(tmp_path, "dino_synthetic", f"model.init_from={exported}").method.module
    for backbone in (method.backbone, method.teacher.backbone):
        assert_same_weights(backbone.state_dict(), weights)
    fresh = _pretrainer(tmp_path / "fresh", "dino_synthetic").method.module.backbone
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])

    run = ["pretrain", "-c", "dino_synthetic", f"run.out_dir={tmp_path}", "run.name=cli", *TINY]
    assert main([*run, f"model.init_from={exported}", "trainer.max_steps=1"]) == 0
    moved = exported.parent / "moved"
    exported.rename(moved)
    try:
        assert main(["pretrain", "--resume", str(tmp_path / "cli"), "trainer.max_steps=1"]) == 0
    finally:
        moved.rename(exported)
    assert safe_torch_load(list_checkpoints(tmp_path / "cli")[-1])["train"]["step"] == 2


def test_an_export_initialises_another_image_size_with_resampled_positions(exported):
    """32 px (4x4 patches) -> 64 px (8x8): the class position is kept, the patch grid is
    resampled bicubically (antialiased, as timm's), everything else is copied."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from attnssl.config import load_config
    from attnssl.export import init_from_export
    from attnssl.nn.vit import build_vit

    model_cfg = load_config("simclr_synthetic").model
    backbone = build_vit(model_cfg, 64, 3)
    init_from_export(backbone, exported, model_cfg)
    weights = load_file(str(exported / "model.safetensors"))
    state = backbone.state_dict()
    for key, value in weights.items():
        if key != "pos_embed":
            assert torch.equal(state[key], value), key
    grid = weights["pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True,
                             align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, -1)
    torch.testing.assert_close(state["pos_embed"][:, :1], weights["pos_embed"][:, :1])
    torch.testing.assert_close(state["pos_embed"][:, 1:], expected)
    assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, model_cfg.embed_dim)


def test_an_export_with_fixed_sincos_positions_gets_the_new_size_s_table(tmp_path):
    from safetensors.torch import load_file

    from attnssl.config import load_config
    from attnssl.export import init_from_export
    from attnssl.nn.vit import build_vit

    assert main(command(tmp_path, "s", "trainer.max_steps=1", "model.pos_embed=sincos")) == 0
    assert main(["export", str(tmp_path / "s"), "--out", str(tmp_path / "e")]) == 0
    model_cfg = load_config("simclr_synthetic", ["model.pos_embed=sincos"]).model
    backbone = build_vit(model_cfg, 64, 3)
    table = backbone.pos_embed.detach().clone()
    init_from_export(backbone, tmp_path / "e", model_cfg)
    torch.testing.assert_close(backbone.pos_embed, table, rtol=0, atol=0)
    weights = load_file(str(tmp_path / "e" / "model.safetensors"))
    torch.testing.assert_close(backbone.blocks[1].mlp.fc2.weight, weights["blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("attention", ["focused_linear", "performer", "linear"])
def test_a_softmax_export_starts_another_attention_that_keeps_qkv_and_proj(exported, attention):
    from safetensors.torch import load_file

    from attnssl.config import load_config
    from attnssl.export import init_from_export
    from attnssl.nn.vit import build_vit

    model_cfg = load_config("simclr_synthetic", [f"model.attention={attention}"]).model
    torch.manual_seed(0)
    backbone = build_vit(model_cfg, 32, 3)
    fresh = {k: v.clone() for k, v in backbone.state_dict().items()}
    init_from_export(backbone, exported, model_cfg)
    weights, state = load_file(str(exported / "model.safetensors")), backbone.state_dict()
    for key, value in state.items():  # every shared tensor from the export, the rest untouched
        assert torch.equal(value, weights[key] if key in weights else fresh[key]), key
    assert all(key in weights for key in state if key.endswith(("qkv.weight", "proj.weight")))
    assert (set(state) == set(weights)) == (attention == "linear")


def test_an_export_of_another_architecture_is_refused_by_name(tmp_path, exported):
    with pytest.raises(ValueError, match=r"model.depth: export 2, this run 3.*model.class_tokens: "
                                         r"export 1, this run 2.*model.attention: "
                                         r"export 'softmax', this run 'cbsa'"):
        _pretrainer(tmp_path, "simclr_synthetic", f"model.init_from={exported}",
                    "model.depth=3", "model.class_tokens=2", "model.attention=cbsa")
    with pytest.raises(FileNotFoundError, match=r"model.init_from=.*nowhere.*config.json is "
                                                r"missing"):
        _pretrainer(tmp_path, "simclr_synthetic", f"model.init_from={tmp_path / 'nowhere'}")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model.init_from=.*damaged.*config.json is not valid "
                                         r"JSON"):
        _pretrainer(tmp_path, "simclr_synthetic", f"model.init_from={damaged}")
    (damaged / "config.json").write_text((exported / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model.safetensors is damaged"):
        _pretrainer(tmp_path, "simclr_synthetic", f"model.init_from={damaged}")


def test_export_of_a_cbsa_backbone_loads_back(tmp_path):
    from attnssl.eval.evaluate import load_trained_backbone
    from attnssl.export import load_exported

    assert main(command(tmp_path, "c", "trainer.max_steps=2", "model.attention=cbsa",
                        "model.cbsa_pool=2", "model.block=cbt")) == 0
    assert main(["export", str(tmp_path / "c"), "--out", str(tmp_path / "e")]) == 0
    description = json.loads((tmp_path / "e" / "config.json").read_text())
    assert description["attnssl"]["timm_loadable"] is False
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            load_exported(tmp_path / "e").eval().forward_features(images),
            load_trained_backbone(tmp_path / "c").backbone.eval().forward_features(images),
            rtol=0, atol=0)
    (tmp_path / "e" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_exported(tmp_path / "e")
