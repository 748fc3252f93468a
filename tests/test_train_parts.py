import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from attnssl.config import ModelSection
from attnssl.data.loader import epoch_batches
from attnssl.nn.ema import ema_update, make_teacher
from attnssl.nn.vit import build_vit
from attnssl.precision import cpu_has_native_bf16, resolve_precision
from attnssl.train.environment import warn_if_bf16_is_emulated
from attnssl.train.optimisation import clip_each_parameter, param_groups


def test_ema_update_follows_its_formula():
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(0.5)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)


def test_epoch_batches_shard_the_epoch_without_overlap():
    per_rank = [epoch_batches(103, 10, epoch=2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in per_rank] == [5, 5]  # 100 of 103 used: drop-last
    seen = torch.cat([torch.cat(b) for b in per_rank])
    assert seen.unique().numel() == 100
    again = epoch_batches(103, 10, epoch=2, seed=5, rank=0, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(again, per_rank[0], strict=True))
    other_epoch = epoch_batches(103, 10, epoch=3, seed=5, rank=0, world_size=2)
    assert not torch.equal(other_epoch[0], per_rank[0][0])


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = build_vit(ModelSection(preset="vit_tiny_p4", depth=1), 28, 1)
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_per_parameter_clipping_scales_each_gradient_on_its_own():
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.6, 0.8])
    clip_each_parameter([big, small], 2.0)
    assert big.grad.norm().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(big.grad, torch.tensor([1.2, 1.6]), atol=1e-5)  # direction kept
    assert torch.equal(small.grad, torch.tensor([0.0, 0.6, 0.8]))  # under the limit: untouched


def _cpu_flags() -> set[str]:
    line = next(r for r in Path("/proc/cpuinfo").read_text().splitlines() if r.startswith("flags"))
    return set(line.split(":", 1)[1].split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_bf16_warning_follows_the_cpu_flags():
    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert cpu_has_native_bf16() == native
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for precision in ("bf16-mixed", "16-mixed", "32"):
            warn_if_bf16_is_emulated(precision, torch.device("cpu"))
        warn_if_bf16_is_emulated("bf16-mixed", torch.device("meta"))  # not a CPU: no warning
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == (0 if native else 2)
    assert all("set trainer.precision=32" in m for m in messages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_auto_precision_is_bf16_only_where_it_is_native(tmp_path):
    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32")
    assert resolve_precision("auto", "mps") == "32"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") == "32"
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"  # explicit values stay
    # a run records what auto resolved to, in metrics.json and in its checkpoints
    from attnssl.cli import main
    from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load

    assert main(["pretrain", "-c", "simclr_synthetic", f"run.out_dir={tmp_path}", "run.name=a",
                 "data.synthetic_size=64", "optim.batch_size=32", "optim.epochs=1",
                 "model.depth=1", "trainer.precision=auto", "trainer.progress_bar=false",
                 "eval.at_end=false"]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["precision_requested"] == "auto"
    assert metrics["precision"] == ("bf16-mixed" if native else "32-true")
    state = safe_torch_load(list_checkpoints(tmp_path / "a")[-1])
    assert state["train"]["precision"] == ("bf16-mixed" if native else "32")


def test_compiled_blocks_train_as_the_eager_ones(tmp_path):
    """``trainer.compile=true`` runs every block through torch.compile (dynamo captures graphs)
    and two steps give the eager run's losses and weights up to float reordering; evaluation
    then runs the blocks eagerly, compiling nothing for its new batch sizes."""
    from timm.models.vision_transformer import Block

    from attnssl.config import load_config
    from attnssl.eval.evaluate import evaluate_backbone
    from attnssl.methods import evaluation_backbone
    from attnssl.train.trainer import Pretrainer

    def run(name: str, *extra: str) -> tuple[list[float], dict, Pretrainer]:
        config = load_config("simclr_synthetic", [
            "data.synthetic_size=64", "optim.batch_size=32", "trainer.progress_bar=false",
            "eval.at_end=false", "trainer.num_threads=1", f"run.out_dir={tmp_path}",
            f"run.name={name}", *extra])
        trainer = Pretrainer(config, tmp_path / name)
        trainer.setup()
        losses = [trainer.training_step(trainer.train_set.get_batch(torch.arange(i, i + 32))[0])
                  ["loss"] for i in (0, 32)]
        blocks = [m for m in trainer.method.modules() if isinstance(m, Block)]
        assert len(blocks) == 2 and all(
            (b._compiled_call_impl is not None) == ("compiled" in name) for b in blocks)
        return losses, trainer.method.module.state_dict(), trainer

    eager_losses, eager_state, _ = run("eager")
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    compiled_losses, compiled_state, trainer = run("compiled", "trainer.compile=true")
    frames_after_training = torch._dynamo.utils.counters["frames"]["ok"]
    assert frames_after_training > frames_before
    assert compiled_state.keys() == eager_state.keys()
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-3, atol=1e-5)
    scores = evaluate_backbone(evaluation_backbone(trainer.method.module), trainer.config)
    assert 0 <= scores["knn_top1"] <= 100
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames_after_training
