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
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnssl.functional.mae import patchify, random_masking, reconstruction_loss, visible_count
from attnssl.nn.mae import MAEDecoder, encode_visible


class MAE(nn.Module):
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

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 1:
            raise ValueError(f"MAE takes one view per image, got {len(views)}; set "
                             f"views.global_crops=1 and views.local_crops=0")
        images = views[0]
        target = patchify(images, self.patch)
        batch, tokens = target.shape[:2]
        noise = torch.rand(batch, tokens, device=images.device)
        keep_idx, mask, restore_idx = random_masking(noise, visible_count(tokens, self.mask_ratio))
        latent = encode_visible(self.backbone, images, keep_idx)
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        pred = self.decoder(latent, restore_idx, grid)
        with torch.autocast(device_type=images.device.type, enabled=False):
            loss = reconstruction_loss(pred.float(), target.float(), mask, self.norm_pix_loss)
        return {"loss": loss, "masked_share": mask.mean()}
