"""SimCLR (Chen et al. 2020): two views, a projector, NT-Xent across the whole global batch."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from attnssl.functional.collapse import embedding_std
from attnssl.losses import NTXentLoss
from attnssl.methods.base import Method, register_method
from attnssl.nn.heads import ProjectionHead
from attnssl.settings import MethodSection


class SimCLRSection(MethodSection):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.2, gt=0)
    projector_hidden: int = Field(512, gt=0)
    projector_out: int = Field(128, gt=0)
    projector_layers: int = Field(2, ge=1)
    projector_batchnorm: bool = True
    projector_last_batchnorm: bool = Field(
        False, description="a batch norm on the projector's output, scale only, no bias: the "
        "official code's head (google-research/simclr); the paper's has none")


@register_method
class SimCLR(Method):
    """``z = g(f(x))`` for every view; ``loss = NT-Xent(z)``, positives being the same image.

    ``f`` is the backbone's class token (timm ``VisionTransformer`` with ``num_classes=0``),
    ``g`` the projector. Only global views are used (SimCLR has no multi-crop).
    """

    name = "simclr"
    Section = SimCLRSection

    @classmethod
    def check_views(cls, config) -> None:
        views = config.views
        if views.local_crops:
            raise ValueError(f"simclr uses global views only; set views.local_crops=0 "
                             f"(got {views.local_crops})")
        if views.global_crops < 2:
            raise ValueError(f"simclr needs views.global_crops >= 2, got {views.global_crops}")
        if config.optim.batch_size < 2:
            raise ValueError(f"simclr contrasts each image with the others of its batch: "
                             f"optim.batch_size must be at least 2, got {config.optim.batch_size}")

    @classmethod
    def build(cls, config, backbone: nn.Module) -> SimCLR:
        return cls(backbone, config.method, n_views=config.views.global_crops)

    def __init__(self, backbone: nn.Module, cfg, n_views: int):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead(
            backbone.embed_dim, cfg.projector_hidden, cfg.projector_out, cfg.projector_layers,
            cfg.projector_batchnorm, cfg.projector_last_batchnorm,
        )
        self.criterion = NTXentLoss(n_views=n_views, temperature=cfg.temperature)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = {v.shape[-1] for v in views}
        if len(sizes) != 1:
            raise ValueError(f"SimCLR takes views of one size, got sizes {sorted(sizes)}")
        z = self.projector(self.backbone(torch.cat(views)))
        loss = self.criterion(z)
        return {"loss": loss, "embedding_std": embedding_std(z.detach())}
