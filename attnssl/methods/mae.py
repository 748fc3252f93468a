"""MAE (He et al. 2022): mask most patches, encode the rest, reconstruct the masked pixels.

Follows the official code (facebookresearch/mae, ``models_mae.py``): per image, the patches of
smallest uniform noise stay visible (``int(N (1 - ratio))`` of them); the encoder (our timm
backbone) sees only those, class token(s) included; the decoder puts one shared mask token at
every masked place, adds fixed sine-cosine positions and predicts every patch's pixels; the
loss is the mean squared error on the masked patches, of per-patch standardised pixels when
``norm_pix_loss``. The encoder's own positions are the fixed sine-cosine table
(``model.pos_embed=sincos`` in the MAE presets).

Pixels are reconstructed in the normalised image space the encoder sees (the official code
reconstructs the normalised tensor as well).

Repeated sampling: with ``views.global_crops = K > 1`` each image is sampled K times per step,
each sample with its own crop, flip and mask, and the loss is the mean over all ``K x B``
samples: ``L = 1/K sum_k L_MAE(x_k, mask_k)`` (every sample masks the same number of patches).
This is the repeated sampling of the MAE authors' video follow-up (Feichtenhofer et al. 2022,
facebookresearch/mae_st, ``--repeat_aug``), which reuses each decoded clip for K samples; the
image MAE code samples each image once (K = 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from attnssl.functional.mae import patchify, random_masking, reconstruction_loss, visible_count
from attnssl.methods.base import Method, register_method
from attnssl.nn.mae import MAEDecoder, encode_visible
from attnssl.settings import MethodSection


class MAESection(MethodSection):
    """MAE (He et al. 2022). Defaults are the official recipe's (facebookresearch/mae; its
    argparse default for ``norm_pix_loss`` is off, its published recipe turns it on) except the
    decoder, scaled to our small backbones (official: width 512, depth 8, 16 heads for ViT-B)."""

    name: Literal["mae"] = "mae"
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="share of patches masked per image")
    norm_pix_loss: bool = Field(True, description="standardise each target patch's pixels")
    decoder_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(4, gt=0)
    decoder_io_init: Literal["xavier", "torch"] = Field(
        "xavier", description="initialisation of the decoder's input embedding and pixel "
        "prediction linears: xavier-uniform as the official code, or torch's nn.Linear default "
        "(uniform +-1/sqrt(fan_in)), which lightly 1.6's MAE example leaves them at")

    @model_validator(mode="after")
    def _check_decoder(self) -> MAESection:
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ValueError(f"decoder_dim={self.decoder_dim} must be divisible by decoder_heads="
                             f"{self.decoder_heads} and by 4 (sine-cosine positions)")
        return self


@register_method
class MAE(Method):
    name = "mae"
    Section = MAESection

    @classmethod
    def check_views(cls, config) -> None:
        views = config.views
        if views.local_crops:
            raise ValueError(
                f"mae reconstructs global views of one size; set views.local_crops=0 (got "
                f"{views.local_crops}; views.global_crops=K samples each image K times)"
            )

    @classmethod
    def build(cls, config, backbone: nn.Module) -> MAE:
        return cls(backbone, config.method)

    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.backbone = backbone
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        self.patch = backbone.patch_embed.patch_size[0]
        channels = backbone.patch_embed.proj.in_channels
        self.decoder = MAEDecoder(
            backbone.embed_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
            self.patch * self.patch * channels, backbone.num_prefix_tokens,
            io_init=cfg.decoder_io_init,
        )

    def forward(self, views: list[torch.Tensor],
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``noise (K*B, N)`` ranks each sample's patches for masking (the smallest stay
        visible; row ``k*B + i`` is view k of image i); drawn uniformly when not given, as the
        official ``random_masking``."""
        if len({tuple(v.shape) for v in views}) != 1:
            raise ValueError(f"MAE takes views of one shape, got "
                             f"{sorted({tuple(v.shape) for v in views})}; set views.local_crops=0")
        images = torch.cat(views) if len(views) > 1 else views[0]
        target = patchify(images, self.patch)
        batch, tokens = target.shape[:2]
        if noise is None:
            noise = torch.rand(batch, tokens, device=images.device)
        elif noise.shape != (batch, tokens):
            raise ValueError(f"noise must be (samples, patches) = {(batch, tokens)}, got "
                             f"{tuple(noise.shape)}")
        keep_idx, mask, restore_idx = random_masking(noise, visible_count(tokens, self.mask_ratio))
        latent = encode_visible(self.backbone, images, keep_idx)
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        pred = self.decoder(latent, restore_idx, grid)
        with torch.autocast(device_type=images.device.type, enabled=False):
            loss = reconstruction_loss(pred.float(), target.float(), mask, self.norm_pix_loss)
        return {"loss": loss, "masked_share": mask.mean()}
