"""iBOT (Zhou et al., ICLR 2022): image BERT pre-training with an online tokenizer.

DINO's class-token self-distillation over multi-crop views, plus masked image modelling: the
student sees its global views with block-wise masked patches replaced by a learned mask
token and predicts, at each masked patch, the EMA teacher's output for that patch of the
unmasked view. Follows the official code, github.com/bytedance/ibot (``main_ibot.py``,
``loader.ImageFolderMask``, ``models/head.iBOTHead``, ``models/vision_transformer``); the loss
is :class:`attnssl.losses.ibot.IBOTLoss`. Defaults are the official ViT-S/16 recipe (its
README's command): ``out_dim`` 8192, a head shared by class and patch tokens, last layer not
normalised, prediction ratio chosen per image from {0, U(0.1, 0.5)}.

Departures, none of which changes the loss: the masks are drawn per batch on the training
process (Python's ``random``, saved in checkpoints) instead of in the data loader, for the
global views only (the official draws and discards them for local views too); the student's
head runs on the class tokens and the masked patches only (the official runs it on every
patch and weighs the unmasked ones 0 in the loss), the teacher's on every token (the mean of
all its patch outputs moves the centre).
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator
from torch.nn.utils.parametrizations import weight_norm

from attnssl.functional.collapse import embedding_std
from attnssl.functional.schedules import teacher_temperature
from attnssl.losses.ibot import IBOTLoss
from attnssl.methods.base import register_method
from attnssl.methods.dino import SelfDistillation, _DistillationSection
from attnssl.methods.multicrop import multicrop_features
from attnssl.nn.heads import DINOHead, GlobalBatchNorm1d
from attnssl.nn.udi import vit_tokens


class IBOTSection(_DistillationSection):
    """iBOT (Zhou et al. 2022, bytedance/ibot)."""

    name: Literal["ibot"] = "ibot"
    out_dim: int = Field(8192, gt=0, description="class-token head outputs K")
    patch_out_dim: int = Field(8192, gt=0, description="patch head outputs (= out_dim when shared)")
    shared_head: bool = Field(True, description="one last layer for class and patch tokens")
    norm_last_layer: bool = False
    pred_ratio: tuple[float, ...] = Field(
        (0.0, 0.3), description="masked share of a global view's patches: one of these per image")
    pred_ratio_var: tuple[float, ...] = Field(
        (0.0, 0.2), description="each ratio drawn uniformly within +- this")
    pred_aspect_ratio: tuple[float, float] = Field(
        (0.3, 1 / 0.3), description="aspect ratio range of the masked blocks")
    lambda_cls: float = Field(1.0, ge=0, description="weight of the class-token loss (lambda1)")
    lambda_patch: float = Field(1.0, ge=0, description="weight of the patch loss (lambda2)")
    warmup_teacher_patch_temp: float = Field(0.04, gt=0)
    teacher_patch_temp: float = Field(0.07, gt=0)
    center_momentum_patch: float = Field(0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _check_ratios(self) -> IBOTSection:
        if len(self.pred_ratio) != len(self.pred_ratio_var):
            raise ValueError(f"pred_ratio {list(self.pred_ratio)} and pred_ratio_var "
                             f"{list(self.pred_ratio_var)} must have the same length")
        for ratio, var in zip(self.pred_ratio, self.pred_ratio_var, strict=True):
            if not 0 <= ratio - var <= ratio + var < 1:
                raise ValueError(f"pred_ratio {ratio} +- {var} must stay within [0, 1)")
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise ValueError(f"a shared head needs patch_out_dim == out_dim, got "
                             f"{self.patch_out_dim} and {self.out_dim}")
        return self


def prediction_ratio(ratios, variances, rng=random) -> float:
    """One image's masked share: each ``r +- v`` drawn uniformly, then one of them picked
    (official ``get_pred_ratio``)."""
    drawn = [rng.uniform(r - v, r + v) if v > 0 else r for r, v in zip(ratios, variances, strict=True)]
    return rng.choice(drawn)


def block_mask(height: int, width: int, target: float, aspect_ratio: tuple[float, float],
               rng=random) -> torch.Tensor:
    """BEiT's block-wise mask on a ``height x width`` patch grid (official
    ``ImageFolderMask``): add rectangles of area ``U(low, left)`` (``low = (min(H, W) // 3)^2``,
    ``left`` the patches still to mask) and log-uniform aspect ratio until at least ``target``
    patches are masked, ten attempts per rectangle, stopping when a rectangle adds none."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_aspect = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
    count = 0
    while count < target:
        left = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform((min(height, width) // 3) ** 2, left)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, lft = rng.randint(0, height - h), rng.randint(0, width - w)
                block = mask[top:top + h, lft:lft + w]
                new = h * w - int(block.sum())
                if 0 < new <= left:
                    block.fill_(True)
                    added += new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


class IBOTHead(DINOHead):
    """DINO's head on every token; with ``shared_head=false`` the patch tokens get a second
    weight-normalised last layer of their own (official ``iBOTHead``, ``last_layer2``)."""

    def __init__(self, in_dim: int, cfg):
        super().__init__(in_dim, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck,
                         cfg.head_layers, cfg.norm_last_layer, cfg.head_batchnorm)
        self.last_layer2 = None
        if not cfg.shared_head:
            self.last_layer2 = weight_norm(nn.Linear(cfg.head_bottleneck, cfg.patch_out_dim,
                                                     bias=False))
            scale = self.last_layer2.parametrizations.weight.original0
            with torch.no_grad():
                scale.fill_(1.0)
            scale.requires_grad_(not cfg.norm_last_layer)

    def class_and_patches(self, tokens: torch.Tensor, masks: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1 + N, D)`` tokens -> ``(B, K)`` class and ``(B, N, K')`` patch outputs; with
        ``(B, N)`` boolean ``masks``, the patch outputs at the masked patches only, ``(M, K')``
        in the order of ``x[masks]``. The head works token by token, so these are the rows the
        whole computation would give; a head with batch norm still runs on every token, whose
        statistics its batch norm takes."""
        batch, dim = tokens.shape[0], tokens.shape[-1]
        select = masks is not None and not any(isinstance(m, GlobalBatchNorm1d) for m in self.mlp)
        patches = tokens[:, 1:][masks] if select else tokens[:, 1:].reshape(-1, dim)
        x = nn.functional.normalize(self.mlp(torch.cat([tokens[:, 0], patches])), dim=-1)
        patch_layer = self.last_layer if self.last_layer2 is None else self.last_layer2
        cls_out, patch_out = self.last_layer(x[:batch]), patch_layer(x[batch:])
        if not select:
            patch_out = patch_out.reshape(batch, -1, patch_out.shape[-1])
            if masks is not None:
                patch_out = patch_out[masks]
        return cls_out, patch_out


def masked_tokens(vit: nn.Module, images: torch.Tensor, masks: torch.Tensor | None,
                  mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ViT's tokens after the final norm, ``(B, 1 + N, D)``, with the patch embeddings
    at ``masks (B, H, W)`` replaced by ``mask_token`` before positions are added (official
    ``prepare_tokens`` / ``mask_model``)."""
    return vit_tokens(vit, images, masks, mask_token)[1]


@register_method
class IBOT(SelfDistillation):
    """Student: masked global views (class tokens and masked patches through the head) and
    local views (class token); teacher (EMA of backbone and head): unmasked global views, all
    tokens. See :class:`IBOTLoss`.

    The mask token has the official ``masked_embed``'s shape ``(1, D)``, zero at the start; the
    last-layer freeze of the first ``freeze_last_layer_epochs`` covers both last layers, and the
    teacher's patch temperature warms up as its class temperature does (per epoch).
    """

    name = "ibot"
    Section = IBOTSection

    @classmethod
    def check_views(cls, config) -> None:
        super().check_views(config)
        if config.views.global_crops < 2:
            raise ValueError(f"ibot distils each global view into the other: set "
                             f"views.global_crops >= 2 (got {config.views.global_crops})")

    def __init__(self, backbone: nn.Module, cfg, n_global: int, n_local: int):
        super().__init__()
        if backbone.num_prefix_tokens != 1:
            raise ValueError("ibot needs a backbone with one class token (model.class_tokens=1)")
        self.cfg = cfg
        self.n_global = n_global
        self.backbone = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))
        self.head = IBOTHead(backbone.embed_dim, cfg)
        self.criterion = IBOTLoss(
            cfg.out_dim, cfg.patch_out_dim, n_global + n_local, n_global, cfg.student_temp,
            cfg.warmup_teacher_temp, cfg.warmup_teacher_patch_temp, cfg.center_momentum,
            cfg.center_momentum_patch, cfg.lambda_cls, cfg.lambda_patch)
        self._make_teacher()
        self.teacher_patch_temp = cfg.warmup_teacher_patch_temp

    def before_step(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        super().before_step(step, steps_per_epoch, total_steps)
        cfg = self.cfg
        self.teacher_patch_temp = teacher_temperature(
            self.epoch, cfg.warmup_teacher_temp_epochs, cfg.warmup_teacher_patch_temp,
            cfg.teacher_patch_temp)

    def before_optimizer_step(self) -> None:
        super().before_optimizer_step()
        if self.epoch < self.cfg.freeze_last_layer_epochs and self.head.last_layer2 is not None:
            for p in self.head.last_layer2.parameters():
                p.grad = None

    def draw_masks(self, n_images: int, grid: tuple[int, int]) -> torch.Tensor:
        """``(n_images, H, W)`` block-wise masks, each at its own prediction ratio."""
        cfg = self.cfg
        return torch.stack([
            block_mask(*grid, prediction_ratio(cfg.pred_ratio, cfg.pred_ratio_var) * grid[0]
                       * grid[1], cfg.pred_aspect_ratio) for _ in range(n_images)])

    def forward(self, views: list[torch.Tensor],
                masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``masks (G*B, H, W)`` (bool, global views stacked view-major) say which patches the
        student sees masked; drawn by :meth:`draw_masks` when not given."""
        globals_ = torch.cat(views[: self.n_global])
        patch = self.backbone.patch_embed.patch_size[0]
        grid = (globals_.shape[-2] // patch, globals_.shape[-1] // patch)
        if masks is None:
            masks = self.draw_masks(globals_.shape[0], grid)
        elif masks.shape != (globals_.shape[0], *grid):
            raise ValueError(f"masks must be (global views x images, *grid) = "
                             f"{(globals_.shape[0], *grid)}, got {tuple(masks.shape)}")
        masks = masks.to(globals_.device)
        tokens = masked_tokens(self.backbone, globals_, masks, self.mask_token)
        s_cls, s_patch = self.head.class_and_patches(tokens, masks.flatten(1))
        if len(views) > self.n_global:
            s_cls = torch.cat([s_cls, self.head(multicrop_features(self.backbone,
                                                                   views[self.n_global:]))])
        with torch.no_grad():
            teacher = self.teacher
            t_cls, t_patch = teacher["head"].class_and_patches(
                masked_tokens(teacher["backbone"], globals_, None))
        out = self.criterion(s_cls, s_patch, t_cls, t_patch, masks.flatten(1), self.teacher_temp,
                             self.teacher_patch_temp)
        batch = views[0].shape[0]
        return {"loss": out.loss, "loss_cls": out.cls, "loss_patch": out.patch,
                **self._schedule_logs(out),
                "teacher_patch_temp": torch.tensor(self.teacher_patch_temp),
                "masked_share": masks.float().mean(),
                "embedding_std": embedding_std(tokens[:batch, 0].detach())}
