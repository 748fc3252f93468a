"""BAM (Shalam & Korman, ECCV 2024): balanced self-attention matching, multi-crop, EMA teacher.

Follows the official code, github.com/DanielShalam/BAM (``main_pretrain.py``,
``models/wrappers.py``, ``bam/bam_loss.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from attnssl.functional.collapse import effective_rank, embedding_std
from attnssl.functional.schedules import cosine, linear_ramp
from attnssl.losses import BAMLoss
from attnssl.methods.base import Method, register_method
from attnssl.methods.multicrop import multicrop_forward
from attnssl.nn.ema import EMATeacher
from attnssl.nn.heads import MLPProjector
from attnssl.settings import MethodSection


class BAMSection(MethodSection):
    """BAM (Shalam & Korman 2024). Defaults are the official code's (DanielShalam/BAM): its
    ViT scripts' settings, except ``top_k`` (off here and in its code's defaults; 128 in its
    scripts)."""

    name: Literal["bam"] = "bam"
    temperature: float = Field(0.1, gt=0, description="source attention softmax temperature")
    sinkhorn_eps: float = Field(0.05, gt=0, description="Sinkhorn entropy regularisation")
    sinkhorn_eps_end: float | None = Field(
        None, gt=0, description="eps reached linearly after sinkhorn_eps_warmup_epochs (null: constant)")
    sinkhorn_eps_warmup_epochs: float = Field(30.0, gt=0)
    sinkhorn_iters: int = Field(3, ge=0, description="Sinkhorn rounds (0: the plain softmax "
                                "target, no balancing)")
    positive_masking: bool = True
    positive_masking_prob: float = Field(
        1.0, ge=0, le=1, description="with positive_masking: the chance each step that an "
        "image's own columns are masked (1: always, the official; 0.5: partial masking)")
    top_k: int = Field(0, ge=0, description="keep the top-k target columns per image (0: off)")
    teacher: bool = Field(True, description="EMA teacher gives the targets (false: self-targets)")
    teacher_momentum: float = Field(0.995, ge=0, le=1, description="EMA momentum, cosine to 1")
    normalization: Literal["global", "local"] = "global"
    blockwise: bool | Literal["auto"] = "auto"
    block_images: int | None = Field(None, gt=0)
    projector_hidden: int = Field(4096, gt=0)
    projector_out: int = Field(4096, gt=0)
    projector_layers: int = Field(3, ge=1)
    projector_batchnorm: bool = Field(
        False, description="batch norm after each hidden projector layer (official ViT scripts: "
        "off; its code's default: on)")
    projector_last_batchnorm: bool = Field(
        False, description="with projector_batchnorm: a batch norm without affine on the "
        "projector's output")
    eval_backbone: Literal["teacher", "student"] | None = Field(
        None, description="backbone evaluated and exported (null: the teacher when there is one)")

    @model_validator(mode="after")
    def _check_pairs(self) -> BAMSection:
        if self.eval_backbone == "teacher" and not self.teacher:
            raise ValueError("eval_backbone=teacher needs teacher=true")
        if self.projector_last_batchnorm and not self.projector_batchnorm:
            raise ValueError("projector_last_batchnorm=true needs projector_batchnorm=true")
        return self


def masks_positives(cfg) -> bool:
    """Whether any image's own columns are ever masked (``positive_masking_prob=0`` is off)."""
    return cfg.positive_masking and cfg.positive_masking_prob > 0


def evaluates_teacher(cfg) -> bool:
    """Whether the teacher's backbone is the one evaluated and exported."""
    return cfg.teacher and cfg.eval_backbone != "student"


@register_method
class BAM(Method):
    """``z = g(f(x))`` for all V views; ``loss = BAMLoss(z, z_teacher)``; EMA teacher update.

    * The teacher (official ``StudentTeacherWrapper``) is a copy of backbone and projector,
      ``theta_t <- m theta_t + (1 - m) theta_s`` with ``m`` from ``teacher_momentum`` to 1 on
      a cosine over the run. It processes all V views, so that Sinkhorn balances over every
      view's row. The official code updates the teacher before each forward with ``m[t]``; we
      update it after each optimiser step with ``m[t]``, the same sequence shifted by one step.
    * Without a teacher (``teacher=false``) the targets are the student's own similarities.
    * ``sinkhorn_eps`` ramps linearly to ``sinkhorn_eps_end`` over
      ``sinkhorn_eps_warmup_epochs`` (the official schedule steps once per epoch; ours per step).
    * The evaluated and exported backbone is the teacher's when there is one, as the official
      k-NN evaluation does.
    """

    name = "bam"
    Section = BAMSection

    @classmethod
    def evaluation_prefix(cls, section: BAMSection) -> str:
        return "teacher.backbone." if evaluates_teacher(section) else "backbone."

    def __init__(self, backbone: nn.Module, cfg, n_global: int, n_local: int):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = MLPProjector(backbone.embed_dim, cfg.projector_hidden,
                                      cfg.projector_out, cfg.projector_layers,
                                      batchnorm=cfg.projector_batchnorm,
                                      last_batchnorm=cfg.projector_last_batchnorm)
        self.criterion = BAMLoss(
            n_views=n_global + n_local, n_global_views=n_global, temperature=cfg.temperature,
            sinkhorn_eps=cfg.sinkhorn_eps, sinkhorn_iters=cfg.sinkhorn_iters,
            positive_masking=masks_positives(cfg), top_k=cfg.top_k,
            normalization=cfg.normalization, blockwise=cfg.blockwise,
            block_images=cfg.block_images,
        )
        self.teacher = (EMATeacher(self._student_modules(), cfg.teacher_momentum)
                        if cfg.teacher else None)
        self.momentum = cfg.teacher_momentum
        self.sinkhorn_eps = cfg.sinkhorn_eps

    def _student_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    @property
    def evaluation_backbone(self) -> nn.Module:
        return self.teacher["backbone"] if evaluates_teacher(self.cfg) else self.backbone

    def before_step(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        cfg = self.cfg
        self.momentum = (self.teacher.set_step(step, total_steps) if self.teacher is not None
                         else cosine(step, total_steps, cfg.teacher_momentum, 1.0))
        end = cfg.sinkhorn_eps if cfg.sinkhorn_eps_end is None else cfg.sinkhorn_eps_end
        ramp = round(cfg.sinkhorn_eps_warmup_epochs * steps_per_epoch)
        self.sinkhorn_eps = linear_ramp(step, ramp, cfg.sinkhorn_eps, end)

    def after_step(self, step: int, total_steps: int) -> None:
        if self.teacher is None:
            return
        self.teacher.update_from(self._student_modules(), step, total_steps)
        self.momentum = self.teacher.momentum

    def _masked_images(self, views: list[torch.Tensor]) -> torch.Tensor | None:
        """Partial positive masking: which images have their own columns masked this step,
        each with ``positive_masking_prob`` (drawn from torch's generator, which checkpoints
        keep); None when every image is (the official rule)."""
        prob = self.cfg.positive_masking_prob
        if not masks_positives(self.cfg) or prob >= 1.0:
            return None
        return torch.rand(views[0].shape[0]) < prob

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z = multicrop_forward(self.backbone, self.projector, views)
        z_teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                z_teacher = multicrop_forward(self.teacher["backbone"],
                                              self.teacher["projector"], views)
        out = self.criterion(z, z_teacher, self.sinkhorn_eps, self._masked_images(views))
        batch = views[0].shape[0]
        with torch.no_grad():
            first_view = z[:batch]  # this process's images only
            stats = {
                "source_entropy": out.source_entropy,
                "target_entropy": out.target_entropy,
                "embedding_std": embedding_std(first_view),
                "effective_rank": effective_rank(first_view),
                "sinkhorn_eps": torch.tensor(self.sinkhorn_eps),
                "teacher_momentum": torch.tensor(self.momentum),
            }
        return {"loss": out.loss, **stats}
