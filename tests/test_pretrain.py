"""End-to-end runs of the CLI on the synthetic dataset (seconds each)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnssl.cli import main
from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load
from attnssl.runs.metrics_log import MetricsLog

pytestmark = pytest.mark.integration  # end-to-end runs of the CLI

TINY = [
    "data.synthetic_size=256", "optim.batch_size=32", "optim.epochs=2",
    "trainer.checkpoint_every_steps=3", "trainer.progress_bar=false", "trainer.num_threads=1",
]


def run_cli(tmp_path: Path, name: str, *extra: str, preset: str = "simclr_synthetic") -> int:
    return main(["pretrain", "-c", preset, f"run.out_dir={tmp_path}",
                 f"run.name={name}", *TINY, *extra])


def final_weights(run_dir: Path) -> dict:
    return safe_torch_load(list_checkpoints(run_dir)[-1])["method"]


def test_cli_smoke_run_writes_the_run_folder(tmp_path, capsys):
    assert run_cli(tmp_path, "smoke", "eval.linear_epochs=3") == 0
    out = capsys.readouterr().out
    assert "k-NN top-1 (cls, k=10)" in out and "random-init backbone" in out
    run = tmp_path / "smoke"
    for name in ("config.yaml", "metrics.json", "loss_curve.png", "backbone.safetensors"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["images_per_second"] > 0
    assert metrics["precision"] == "32-true" and metrics["machine"]["cpu"]
    ev = metrics["eval"]
    for key in ("knn_top1", "linear_top1", "knn_top1_random_init"):
        assert 0 <= ev[key] <= 100
    # the eval command reads the run back and agrees with the end-of-run k-NN
    assert main(["eval", str(run), "eval.linear_probe=false"]) == 0
    written = json.loads((run / "eval-step-00000016.json").read_text())
    assert written["knn_top1"] == pytest.approx(ev["knn_top1"])
    # fine-tuning and low-shot evaluation, on request
    capsys.readouterr()
    assert main(["eval", str(run), "eval.linear_probe=false", "eval.random_init_floor=false",
                 "eval.low_shot=[0.1]", "eval.finetune.enabled=true", "eval.finetune.epochs=1",
                 "eval.finetune.batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "knn_top1" in json.loads((run / "eval-step-00000016.json").read_text())  # kept
    written = json.loads((run / "eval-step-00000016-2.json").read_text())  # the second eval
    assert 0 <= written["finetune_top1"] <= 100 and "fine-tuned top-1" in out
    low = written["low_shot"]["10%"]
    assert low["train_images"] == 26  # synthetic_size=256, about 32 per class
    assert {"linear_top1", "finetune_top1"} <= low.keys() and "low-shot, 10% of the labels" in out


@pytest.mark.parametrize("preset", ["simclr_synthetic", "bam_synthetic", "dino_synthetic",
                                    "udi_synthetic", "mae_synthetic"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, preset):
    """BAM, DINO and UDI runs also carry an EMA teacher, local crops and schedules; DINO's and
    UDI's their centres and frozen last layer (epoch 0); UDI's its patch samples; MAE's its
    random masks."""
    assert run_cli(tmp_path, "straight", "eval.at_end=false", preset=preset) == 0
    # sessions of at most 5 steps: stop mid-epoch 0 (checkpoints at 3 and 5), go on to 10 (past
    # the epoch end at 8), then lift the limit and finish
    run = tmp_path / "interrupted"
    assert run_cli(tmp_path, "interrupted", "eval.at_end=false", "trainer.max_steps=5",
                   preset=preset) == 0
    assert list_checkpoints(run)[-1].name == "step-00000005.ckpt"
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert list_checkpoints(run)[-1].name == "step-00000010.ckpt"
    assert main(["pretrain", "--resume", str(run), "trainer.max_steps=null"]) == 0
    assert list_checkpoints(run)[-1].name == "step-00000016.ckpt"
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL the process as soon as its first checkpoint exists; resume; compare."""
    assert run_cli(tmp_path, "straight", "eval.at_end=false") == 0
    args = [sys.executable, "-m", "attnssl", "pretrain", "-c", "simclr_synthetic",
            f"run.out_dir={tmp_path}", "run.name=killed", "eval.at_end=false", *TINY]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / "killed") and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = list_checkpoints(tmp_path / "killed")
    assert killed_at and killed_at[-1].name != "step-00000016.ckpt", "run ended before the kill"
    assert main(["pretrain", "--resume", str(tmp_path / "killed")]) == 0
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    assert run_cli(tmp_path, "once", "eval.at_end=false", "trainer.max_steps=3") == 0
    assert run_cli(tmp_path, "once", "eval.at_end=false") == 2
    assert "already has checkpoints; resume it with --resume" in capsys.readouterr().err


def test_config_errors_stop_before_any_work(tmp_path, capsys):
    assert run_cli(tmp_path, "bad", "optim.batchsize=8") == 2
    err = capsys.readouterr().err
    assert "unknown key optim.'batchsize' (did you mean 'batch_size'?)" in err
    assert not (tmp_path / "bad").exists()


def test_batch_larger_than_dataset_is_named(tmp_path, capsys):
    assert run_cli(tmp_path, "big", "optim.batch_size=1024") == 2
    assert "optim.batch_size=1024 is larger than the dataset (256 images)" in capsys.readouterr().err


def test_two_process_run_resumes_to_the_same_weights(tmp_path):
    """Real gloo processes launched by Fabric; each restores its own RNG and view state.

    UDI stands for every method here: what a two-process resume adds over the one-process
    resume (tested for each method) is each rank's own random state, and UDI draws the most
    from it (crops with their overlap, and the stratified patch samples)."""
    preset = "udi_synthetic"
    two = ["trainer.accelerator=cpu", "trainer.devices=2", "eval.at_end=false"]

    def cli(*extra):
        args = [sys.executable, "-m", "attnssl", "pretrain", *extra]
        done = subprocess.run(args, timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    common = ["-c", preset, f"run.out_dir={tmp_path}", *TINY, *two]
    cli(*common, "run.name=straight")
    cli(*common, "run.name=interrupted", "trainer.max_steps=5")
    cli("--resume", str(tmp_path / "interrupted"), "trainer.max_steps=null")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("preset", ["simclr_synthetic", "dino_synthetic", "udi_synthetic",
                                    "mae_synthetic"])
def test_bf16_mixed_run_trains(tmp_path, preset):
    """Every method under bf16 autocast (UDI passes its patch samples as an extra input)."""
    assert run_cli(tmp_path, "bf16", "trainer.precision=bf16-mixed", "trainer.max_steps=3",
                   "eval.at_end=false", preset=preset) == 0
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["precision"] == "bf16-mixed" and metrics["steps"] == 3
    losses = [float(r["loss"]) for r in MetricsLog(tmp_path / "bf16" / "metrics.csv").read()]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("preset,attention", [
    ("udi_synthetic", ["model.attention=cbsa"]),  # two class tokens, local crops' 2x2 grid
    ("mae_synthetic", ["model.attention=cbsa"]),  # visible subsets of the grid
    ("dino_synthetic", ["model.attention=agent", "model.block=cbt"]),
    ("bam_synthetic", ["model.attention=mssa", "trainer.precision=bf16-mixed"]),
])
def test_any_method_trains_on_any_attention(tmp_path, preset, attention):
    assert run_cli(tmp_path, "attn", *attention, "trainer.max_steps=4", "eval.at_end=false",
                   preset=preset) == 0
    losses = [float(r["loss"]) for r in MetricsLog(tmp_path / "attn" / "metrics.csv").read()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    config = safe_torch_load(list_checkpoints(tmp_path / "attn")[-1])["config"]
    assert config["model"]["attention"] == attention[0].partition("=")[2]


def test_resume_refuses_changes_that_break_exactness(tmp_path, capsys):
    assert run_cli(tmp_path, "r", "eval.at_end=false", "trainer.max_steps=2") == 0
    assert main(["pretrain", "--resume", str(tmp_path / "r"), "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr cannot change when resuming" in err and "trainer.max_steps" in err


def test_eval_of_a_file_that_is_no_checkpoint_is_named(tmp_path, capsys):
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, other)
    assert main(["eval", str(other)]) == 2
    assert "is not an attnssl training checkpoint (missing method" in capsys.readouterr().err


def test_pretrain_from_python_follows_the_resume_policy(tmp_path, capsys):
    from attnssl.config import ConfigError, load_config
    from attnssl.train.trainer import pretrain

    def config(*extra):
        return load_config("simclr_synthetic", [f"run.out_dir={tmp_path}", "run.name=p", *TINY,
                                                "eval.at_end=false", "run.resume=auto", *extra])

    assert not pretrain(config("trainer.max_steps=3"))["finished"]
    finished = pretrain(config())  # run.resume=auto: continues the folder's checkpoint
    assert finished["finished"] and finished["step"] == 16
    assert "run.resume=auto: continuing" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"other settings: optim.lr \(trained 0.001, asked 0.5\)"):
        pretrain(config("optim.lr=0.5"))
    with pytest.raises(ConfigError, match="trained with other settings: optim.lr"):
        pretrain(config("optim.lr=0.5", "run.resume=never"), resume=str(tmp_path / "p"))


def test_linear_scaling_rule_sets_the_peak_learning_rate(tmp_path):
    from attnssl.config import load_config
    from attnssl.functional.schedules import warmup_cosine
    from attnssl.train.trainer import pretrain

    config = load_config("simclr_synthetic", [
        f"run.out_dir={tmp_path}", "run.name=scaled", *TINY, "eval.at_end=false",
        "trainer.log_every_steps=1", "optim.lr=0.004", "optim.lr_scaling_batch=256",
        "optim.warmup_epochs=1"])
    assert config.optim.peak_lr == pytest.approx(0.004 * 32 / 256)
    pretrain(config)
    logged = MetricsLog(tmp_path / "scaled" / "metrics.csv").read()
    total, warmup = 16, 8  # 256 images / 32 per step, 2 epochs, warm-up 1 epoch
    expected = [warmup_cosine(step, total, warmup, 0.004 * 32 / 256, config.optim.min_lr)
                for step in range(total)]
    lrs = [float(row["lr"]) for row in logged]
    assert lrs == pytest.approx(expected)
    assert max(lrs) < 0.004 / 4  # not the unscaled 0.004
