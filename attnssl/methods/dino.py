"""DINO (Caron et al. 2021): self-distillation with no labels, multi-crop, EMA teacher.

Follows the official code, github.com/facebookresearch/dino (``main_dino.py``,
``vision_transformer.DINOHead``, ``utils.cancel_gradients_last_layer``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from attnssl.functional.collapse import embedding_std
from attnssl.functional.schedules import teacher_temperature
from attnssl.losses.dino import DINOLoss
from attnssl.methods.base import Method, register_method
from attnssl.methods.multicrop import multicrop_features, multicrop_forward
from attnssl.nn.ema import EMATeacher
from attnssl.nn.heads import DINOHead
from attnssl.settings import MethodSection


class _DistillationSection(MethodSection):
    """What DINO and UDI share. Defaults are the official UDI code's (QingSuML/udi), which
    are DINO's ViT-S/16 recipe; DINO's own code defaults to a constant teacher temperature of
    0.04 (``warmup_teacher_temp_epochs=0``)."""

    out_dim: int = Field(65536, gt=0, description="head outputs K (prototypes)")
    head_hidden: int = Field(2048, gt=0)
    head_bottleneck: int = Field(256, gt=0)
    head_layers: int = Field(3, ge=1)
    head_batchnorm: bool = False
    norm_last_layer: bool = Field(True, description="fix the last layer's weight-norm scales at 1")
    freeze_last_layer_epochs: int = Field(1, ge=0, description="drop its gradients meanwhile")
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0, description="teacher temperature after the warm-up")
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: int = Field(30, ge=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    teacher_momentum: float = Field(0.996, ge=0, le=1, description="EMA momentum, cosine to 1")


class DINOSection(_DistillationSection):
    """DINO (Caron et al. 2021, facebookresearch/dino)."""

    name: Literal["dino"] = "dino"
    centering: Literal["ema", "sinkhorn"] = Field(
        "ema", description="teacher targets: DINO's EMA centre, or DINOv2's Sinkhorn-Knopp")
    sinkhorn_iters: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations (DINOv2: 3)")


def build_head(embed_dim: int, cfg) -> DINOHead:
    return DINOHead(embed_dim, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.head_layers,
                    cfg.norm_last_layer, cfg.head_batchnorm)


class SelfDistillation(Method):
    """What DINO and UDI share: an EMA teacher of the student's modules, its schedules, and
    the last head layer held still during the first ``freeze_last_layer_epochs``.

    * teacher: ``theta_t <- m theta_t + (1 - m) theta_s``, ``m`` from ``teacher_momentum`` to 1
      on a cosine over the run (per step, as the official ``momentum_schedule``);
    * teacher temperature: ``warmup_teacher_temp`` to ``teacher_temp`` linearly over
      ``warmup_teacher_temp_epochs``, stepped per epoch;
    * the gradients of ``head.last_layer`` are dropped after clipping while
      ``epoch < freeze_last_layer_epochs`` (the official ``cancel_gradients_last_layer``).

    The teacher's backbone is the one evaluated and exported, as the official evaluation
    scripts load the ``teacher`` key.
    """

    student_keys: tuple[str, ...] = ("backbone", "head")

    @classmethod
    def evaluation_prefix(cls, section) -> str:
        return "teacher.backbone."

    def _make_teacher(self) -> None:
        self.teacher = EMATeacher(self._student_modules(), self.cfg.teacher_momentum)
        self.momentum = self.cfg.teacher_momentum
        self.teacher_temp = self.cfg.warmup_teacher_temp
        self.epoch = 0

    def _student_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({key: getattr(self, key) for key in self.student_keys})

    @property
    def evaluation_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    def before_step(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        cfg = self.cfg
        self.epoch = step // steps_per_epoch
        self.momentum = self.teacher.set_step(step, total_steps)
        self.teacher_temp = teacher_temperature(
            self.epoch, cfg.warmup_teacher_temp_epochs, cfg.warmup_teacher_temp, cfg.teacher_temp)

    def before_optimizer_step(self) -> None:
        if self.epoch < self.cfg.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher.update_from(self._student_modules(), step, total_steps)
        self.momentum = self.teacher.momentum

    def _schedule_logs(self, out) -> dict[str, torch.Tensor]:
        """What every self-distillation step logs: the teacher's collapse diagnostics from the
        loss's output ``out``, and the schedules' values."""
        return {
            "teacher_entropy": out.teacher_entropy, "kl_teacher_student": out.kl,
            "teacher_temp": torch.tensor(self.teacher_temp),
            "teacher_momentum": torch.tensor(self.momentum),
        }


@register_method
class DINO(SelfDistillation):
    """``s = h(f(x))`` for all V views, ``t = h_t(f_t(x))`` for the G global views;
    ``loss = DINOLoss(s, t)``; EMA teacher update after each optimiser step.

    The official code updates the teacher after the optimiser step with ``m[t]`` as we do.
    """

    name = "dino"
    Section = DINOSection

    def __init__(self, backbone: nn.Module, cfg, n_global: int, n_local: int):
        super().__init__()
        self.cfg = cfg
        self.n_global = n_global
        self.backbone = backbone
        self.head = build_head(backbone.embed_dim, cfg)
        self.criterion = DINOLoss(cfg.out_dim, n_global + n_local, n_global, cfg.student_temp,
                                  cfg.warmup_teacher_temp, cfg.center_momentum,
                                  cfg.centering, cfg.sinkhorn_iters)
        self._make_teacher()

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        features = multicrop_features(self.backbone, views)
        out = self.criterion(self.head(features), self._teacher_outputs(views), self.teacher_temp)
        batch = views[0].shape[0]
        return {"loss": out.loss, **self._schedule_logs(out),
                "embedding_std": embedding_std(features[:batch].detach())}

    @torch.no_grad()
    def _teacher_outputs(self, views: list[torch.Tensor]) -> torch.Tensor:
        return multicrop_forward(self.teacher["backbone"], self.teacher["head"],
                                 views[: self.n_global])
