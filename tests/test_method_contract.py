"""The method contract: every registered method trains, checkpoints, resumes, is evaluated and
exported through the registry alone; a method defined outside the package plugs in the same way."""

from typing import Literal

import pytest
import torch
import torch.nn as nn
from pydantic import Field

from attnssl.cli import main
from attnssl.config import ConfigError, load_config, preset_names
from attnssl.eval.evaluate import load_trained_backbone
from attnssl.methods import Method, base, build_method, method_names, register_method
from attnssl.nn.vit import build_vit
from attnssl.runs.checkpoint import list_checkpoints, safe_torch_load
from attnssl.runs.metrics_log import MetricsLog
from attnssl.runs.trained import config_from_checkpoint
from attnssl.settings import MethodSection
from attnssl.train.trainer import pretrain

pytestmark = pytest.mark.integration  # real runs of every method

SHORT = ["data.synthetic_size=64", "optim.batch_size=16", "optim.epochs=1",
         "trainer.checkpoint_every_steps=2", "trainer.progress_bar=false",
         "trainer.num_threads=1", "eval.linear_epochs=2"]
# a method's Fashion-MNIST preset on the synthetic images (32 px), with a small backbone
ON_SYNTHETIC = ["data.dataset=synthetic", "model.preset=null", "model.patch_size=4",
                "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                "trainer.precision=32", *SHORT]


def test_every_registered_method_has_its_preset():
    for name in method_names():
        assert f"{name}_fashion_mnist" in preset_names(), name


@pytest.mark.parametrize("name", method_names())
def test_registered_method_trains_resumes_and_evaluates_its_declared_backbone(tmp_path, name):
    args = ["pretrain", "-c", f"{name}_fashion_mnist", f"run.out_dir={tmp_path}", "run.name=r",
            *ON_SYNTHETIC]
    assert main([*args, "trainer.max_steps=2"]) == 0  # stops with a checkpoint at step 2
    run = tmp_path / "r"
    assert [c.name for c in list_checkpoints(run)] == ["step-00000002.ckpt"]
    assert main(["pretrain", "--resume", str(run), "trainer.max_steps=null"]) == 0
    checkpoint = safe_torch_load(list_checkpoints(run)[-1])
    assert checkpoint["train"]["step"] == 4

    # the backbone the evaluation loads (through the method's evaluation_prefix) is the one
    # the method declares as its evaluation_backbone
    config = config_from_checkpoint(checkpoint)
    method = build_method(config, build_vit(config.model, 32, 3))
    method.load_state_dict(checkpoint["method"])
    loaded = load_trained_backbone(run)
    declared = method.evaluation_backbone.state_dict()
    assert loaded.backbone.state_dict().keys() == declared.keys()
    for key, value in loaded.backbone.state_dict().items():
        assert torch.equal(value, declared[key]), key


class CountingSection(MethodSection):
    name: Literal["counting"] = "counting"
    weight: float = Field(1.0, gt=0)


class Counting(Method):
    """A method from outside the package: two views pulled together (``||f(x1) - f(x2)||^2``),
    recording the hooks the trainer calls, in order."""

    name = "counting"
    Section = CountingSection
    calls: list[str] = []  # of every instance, emptied by the fixture

    def __init__(self, backbone: nn.Module, cfg, n_global: int, n_local: int):
        super().__init__()
        self.backbone, self.weight = backbone, cfg.weight

    def before_step(self, step, steps_per_epoch, total_steps):
        self.calls.append(f"before_step {step}")

    def before_optimizer_step(self):
        self.calls.append("before_optimizer_step")

    def after_step(self, step, total_steps):
        self.calls.append(f"after_step {step}")

    def forward(self, views):
        first, second = (self.backbone(v) for v in views[:2])
        return {"loss": self.weight * (first - second).pow(2).sum(-1).mean()}


@pytest.fixture
def counting_registered(monkeypatch):
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    monkeypatch.setattr(Counting, "calls", [])
    register_method(Counting)


def test_a_method_registered_outside_the_package_is_configured_and_trained(
        tmp_path, counting_registered):
    overrides = [f"run.out_dir={tmp_path}", "run.name=c", "method.name=counting",
                 "method.weight=2.0", "views.local_crops=0", "eval.at_end=false",
                 "model.preset=null", "model.patch_size=8", "model.embed_dim=32", "model.depth=1",
                 "model.num_heads=2", "data.dataset=synthetic", *SHORT]
    config = load_config(None, overrides)
    assert isinstance(config.method, CountingSection) and config.method.weight == 2.0
    with pytest.raises(ConfigError, match="unknown key method.'wieght'.*accepted: name, weight"):
        load_config(None, [*overrides, "method.wieght=1"])

    metrics = pretrain(config)
    assert metrics["finished"] and metrics["steps"] == 4
    per_step = [[f"before_step {s}", "before_optimizer_step", f"after_step {s}"] for s in range(4)]
    assert Counting.calls == [c for step in per_step for c in step]


def test_a_section_whose_name_differs_from_the_method_is_refused(counting_registered):
    class Misnamed(Counting):
        name = "misnamed"

    with pytest.raises(TypeError, match="registered as 'misnamed'"):
        register_method(Misnamed)


@pytest.mark.parametrize("name", method_names())
def test_registered_method_repeats_its_losses_given_the_seed(tmp_path, name):
    """Every random draw (views, masks, noise) comes from generators the run seeds."""
    losses = []
    for run in ("a", "b"):
        assert main(["pretrain", "-c", f"{name}_fashion_mnist", f"run.out_dir={tmp_path}",
                     f"run.name={run}", *ON_SYNTHETIC, "trainer.max_steps=2",
                     "trainer.log_every_steps=1", "eval.at_end=false"]) == 0
        losses.append([row["loss"] for row in MetricsLog(tmp_path / run / "metrics.csv").read()])
    assert len(losses[0]) == 2 and losses[0] == losses[1]
