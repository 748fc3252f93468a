import pickle

import pytest
import torch

from attnssl.runs.checkpoint import (
    UNREADABLE,
    atomic_torch_save,
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    safe_torch_load,
)
from attnssl.runs.metrics_log import MetricsLog


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('ran')",))


def test_checkpoint_with_pickled_code_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"weights": torch.ones(2), "payload": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="holds pickled objects other than tensors") as err:
        safe_torch_load(path)
    assert not (tmp_path / "PWNED").exists()
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)


def test_atomic_save_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "checkpoints" / "step-00000001.ckpt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    atomic_torch_save({"w": torch.ones(3)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "step-00000001.ckpt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        atomic_torch_save({"w": lambda: None}, path)  # cannot be pickled: fails mid-save
    assert torch.equal(safe_torch_load(path)["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def training_checkpoint(step: int) -> dict:
    return {"method": {"w": torch.full((2,), float(step))}, "optimizer": {}, "train": {"step": step},
            "ranks": [], "config": {}}


def test_newest_checkpoint_pruning_and_resolution(tmp_path):
    run = tmp_path / "run"
    for step in (3, 12, 7):
        atomic_torch_save(training_checkpoint(step), run / "checkpoints" / f"step-{step:08d}.ckpt")
    assert latest_checkpoint(run).name == "step-00000012.ckpt"
    (run / "checkpoints" / ".step-00000013.ckpt.abc.tmp").write_bytes(b"torn")  # a killed save
    prune_checkpoints(run, keep=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000007.ckpt", "step-00000012.ckpt"]
    assert resolve_checkpoint(run) == latest_checkpoint(run)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a run folder"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no readable checkpoints"):
        resolve_checkpoint(tmp_path)


def test_metrics_log_is_cut_back_to_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for step in (2, 4, 6, 8):
        log.append(step, {"loss": 1.0 / step, "lr": 0.1})
    log.truncate_after(5)
    assert [int(r["step"]) for r in log.read()] == [2, 4]
    log.append(6, {"loss": 0.5, "lr": 0.1})
    assert [int(r["step"]) for r in log.read()] == [2, 4, 6]


def test_a_damaged_newest_checkpoint_is_passed_over(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (4, 8):
        atomic_torch_save(training_checkpoint(step), run / "checkpoints" / f"step-{step:08d}.ckpt")
    newest = run / "checkpoints" / "step-00000008.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated later on
    assert resolve_checkpoint(run).name == "step-00000004.ckpt"
    assert f"passing over unreadable checkpoint {newest}" in capsys.readouterr().err
    newest.write_bytes(b"")
    (run / "checkpoints" / "step-00000004.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(FileNotFoundError, match="has no readable checkpoints"):
        resolve_checkpoint(run)


def test_a_lazy_read_gives_the_same_checkpoint_and_refuses_the_same_damage(tmp_path):
    path = tmp_path / "step-00000004.ckpt"
    state = training_checkpoint(4)
    state["method"]["big"] = torch.randn(64, 256)
    state["config"] = {"optim": {"lr": 0.001}}
    atomic_torch_save(state, path)
    lazy, full = load_training_checkpoint(path, lazy=True), load_training_checkpoint(path)
    assert lazy["config"] == full["config"] == state["config"]
    for key in ("w", "big"):
        assert torch.equal(lazy["method"][key], full["method"][key])
    whole = path.read_bytes()
    for keep in (len(whole) - 1, len(whole) // 2, 100):
        path.write_bytes(whole[:keep])
        for lazy_read in (True, False):
            with pytest.raises(UNREADABLE):
                load_training_checkpoint(path, lazy=lazy_read)
    torch.save({"weights": torch.ones(2)}, path)  # readable, but not a training checkpoint
    with pytest.raises(ValueError, match="not an attnssl training checkpoint"):
        load_training_checkpoint(path, lazy=True)
