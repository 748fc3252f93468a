"""SimCLR (Chen et al. 2020): two views, a projector, NT-Xent across the whole global batch."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.losses import NTXentLoss
from attnssl.nn.heads import ProjectionHead


class SimCLR(nn.Module):
    """``z = g(f(x))`` for every view; ``loss = NT-Xent(z)``, positives being the same image.

    ``f`` is the backbone's class token (timm ``VisionTransformer`` with ``num_classes=0``),
    ``g`` the projector. Only global views are used (SimCLR has no multi-crop).
    """

    def __init__(self, backbone: nn.Module, cfg, n_views: int):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead(
            backbone.embed_dim, cfg.projector_hidden, cfg.projector_out, cfg.projector_layers,
            cfg.projector_batchnorm,
        )
        self.criterion = NTXentLoss(n_views=n_views, temperature=cfg.temperature)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = {v.shape[-1] for v in views}
        if len(sizes) != 1:
            raise ValueError(f"SimCLR takes views of one size, got sizes {sorted(sizes)}")
        z = self.projector(self.backbone(torch.cat(views)))
        loss = self.criterion(z)
        with torch.no_grad():
            embedding_std = F.normalize(z.float(), dim=-1).std(dim=0).mean()
        return {"loss": loss, "embedding_std": embedding_std}
