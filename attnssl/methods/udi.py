"""UDI (Su & Ji, ECCV 2024): unsqueezed distillation, DINO with two class tokens, stratified
patch sampling and multimodal targets.

Follows the official code, github.com/QingSuML/udi (``main_udi.py``, ``utils.UDIWrapper``,
``utils.MultiCropWrapper``, ``vision_transformer.MaskedAttention``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from attnssl.data.udi_views import UDISampling, UDIViews
from attnssl.functional.collapse import embedding_std
from attnssl.losses.udi import UDILoss
from attnssl.methods.base import register_method
from attnssl.methods.dino import SelfDistillation, _DistillationSection, build_head
from attnssl.methods.multicrop import same_size_runs
from attnssl.nn.udi import SampledPatchAttention, vit_tokens


class UDISection(_DistillationSection):
    """UDI (Su & Ji 2024, QingSuML/udi): two class tokens, stratified patch sampling,
    multimodal targets. Windows of stratified sampling: ``sampling_window_global`` on the
    global views' patch grid (3 on 14x14), ``sampling_window_local`` on the local views' (2 on
    6x6)."""

    name: Literal["udi"] = "udi"
    alpha: float = Field(0.5, ge=0, le=1, description="patch share of the multimodal target")
    sampling_window_global: int = Field(3, gt=0)
    sampling_window_local: int = Field(2, gt=0)
    patch_attention_heads: int | None = Field(
        None, gt=0, description="heads of the patch-representation layer (null: the backbone's)")
    patch_head: Literal["shared", "separate"] = Field(
        "shared", description="shared: one head projects cls, cls+ and the patch "
        "representations (the official); separate: a second head of the same shape (and its "
        "EMA teacher) projects the patch representations")


@register_method
class UDI(SelfDistillation):
    """Student: the backbone (two class tokens) on all views, the sampled-patch attention on
    the global views; teacher (EMA of both and of the head) on the global views only. One head
    is shared by ``cls``, ``cls+`` and the patch representations. See :class:`UDILoss`.

    Departures from the official code, none of which changes the loss: the teacher runs its
    backbone once (the official runs it once per map set), and the student computes no patch
    representations for local views (the official computes and discards them). The patch
    attention has the backbone's number of heads unless ``patch_attention_heads`` is set (the
    official fixes 6, ViT-S's). ``patch_head=separate`` (not in the paper; its ablation
    question) gives the patch representations a head of their own.
    """

    name = "udi"
    Section = UDISection
    class_tokens = 2
    student_keys = ("backbone", "patch_attention", "head")

    @classmethod
    def build_views(cls, config, image_size: int, channels: int, mean, std, patch_size: int,
                    seed: int) -> UDIViews:
        """UDI's view maker also tracks where each crop came from and samples its patches."""
        m = config.method
        return UDIViews(config.views, image_size, channels, mean, std, patch_size,
                        m.sampling_window_global, m.sampling_window_local, seed)

    def __init__(self, backbone: nn.Module, cfg, n_global: int, n_local: int):
        super().__init__()
        if getattr(backbone, "num_prefix_tokens", 1) != 2:
            raise ValueError("udi needs a backbone with two class tokens (model.class_tokens=2)")
        if n_global != 2:
            raise ValueError(f"udi needs views.global_crops=2, got {n_global}")
        self.cfg = cfg
        self.backbone = backbone
        heads = cfg.patch_attention_heads or backbone.blocks[0].attn.num_heads
        self.patch_attention = SampledPatchAttention(backbone.embed_dim, heads)
        self.head = build_head(backbone.embed_dim, cfg)
        if cfg.patch_head == "separate":
            self.patch_head = build_head(backbone.embed_dim, cfg)
            self.student_keys = (*type(self).student_keys, "patch_head")
        self.criterion = UDILoss(cfg.out_dim, cfg.alpha, cfg.student_temp,
                                 cfg.warmup_teacher_temp, cfg.center_momentum)
        self._make_teacher()

    def _student_outputs(self, views: list[torch.Tensor], sampling: UDISampling):
        class_tokens, patch_out = [], None
        for start, end in same_size_runs(views):
            tokens, normed = vit_tokens(self.backbone, torch.cat(views[start:end]))
            class_tokens.append(normed[:, :2])
            if start == 0:  # the global views: patch representations at their own samples
                maps = sampling.student_maps.flatten(0, 1).unsqueeze(0)  # (1, 2B, S, N)
                patch_out = self.patch_attention(tokens[: maps.shape[1], 2:], maps)[0]
        class_tokens = torch.cat(class_tokens)  # (V*B, 2, D)
        return class_tokens, patch_out

    @torch.no_grad()
    def _teacher_outputs(self, views: list[torch.Tensor], sampling: UDISampling):
        teacher = self.teacher
        tokens, normed = vit_tokens(teacher["backbone"], torch.cat(views[:2]))
        patches = tokens[:, 2:]
        batch = views[0].shape[0]
        global_rows = teacher["patch_attention"](patches, sampling.teacher_maps.flatten(0, 1)[None])
        local_rows = None
        if sampling.local_maps.shape[0]:
            local_rows = teacher["patch_attention"](patches, sampling.local_maps.flatten(1, 2))
        head = teacher["head"]
        # ModuleDict has no get()
        patch_head = teacher["patch_head"] if "patch_head" in teacher else head  # noqa: SIM401
        t_cls = head(normed[:, 0]).view(2, batch, -1)
        t_patch = patch_head(global_rows[0]).view(2, batch, global_rows.shape[2], -1)
        if local_rows is None:
            t_local = t_cls.new_zeros(0, 2, batch, 0, t_cls.shape[-1])
        else:
            t_local = patch_head(local_rows).view(local_rows.shape[0], 2, batch,
                                                  local_rows.shape[2], -1)
        return t_cls, t_patch, t_local

    def forward(self, views: list[torch.Tensor], sampling: UDISampling) -> dict[str, torch.Tensor]:
        n_views, batch = len(views), views[0].shape[0]
        class_tokens, patch_out = self._student_outputs(views, sampling)
        logits = self.head(class_tokens).view(n_views, batch, 2, -1)
        patch_head = self.patch_head if self.cfg.patch_head == "separate" else self.head
        s_patch = patch_head(patch_out).view(2, batch, patch_out.shape[1], -1)
        t_cls, t_patch, t_local = self._teacher_outputs(views, sampling)
        out = self.criterion(logits[:, :, 0], logits[:, :, 1], s_patch, t_cls, t_patch, t_local,
                             sampling.valid, sampling.local_valid, self.teacher_temp)
        return {
            "loss": out.loss, "loss_cls": out.cls, "loss_cls_plus": out.cls_plus,
            "loss_patch": out.patch, **self._schedule_logs(out),
            "embedding_std": embedding_std(class_tokens[:batch, 0].detach()),
            "valid_patch_share": sampling.valid.float().mean(),
        }
