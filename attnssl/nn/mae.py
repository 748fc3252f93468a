"""MAE's network parts on a timm ViT: the encoder run on visible patches, and the light decoder
(He et al. 2022; official ``models_mae.py``, facebookresearch/mae)."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from attnssl.functional.mae import sincos_position_table
from attnssl.nn.attention import SoftmaxAttention, token_layout


def embed_patches(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, prefix + N, D)`` tokens with positions added (before any block), and the grid."""
    x = vit.patch_embed(images)
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else vit.patch_embed.grid_size
    return vit._pos_embed(x), grid


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, i]]`` for ``tokens (B, N, D)`` and ``index (B, K)``."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def encode_visible(vit: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """The encoder on the visible patches only: ``(B, prefix + K, D)`` after the final norm.

    Positions are added before the patches are dropped (as the official ``forward_encoder``),
    so each visible token keeps its place; attention layers that pool the patch grid (CBSA) are
    told which grid cells the visible tokens hold.
    """
    x, grid = embed_patches(vit, images)
    prefix = vit.num_prefix_tokens
    x = torch.cat([x[:, :prefix], gather_tokens(x[:, prefix:], keep_idx)], dim=1)
    x = vit.norm_pre(x)
    with token_layout(vit, grid, keep_idx):
        x = vit.blocks(x)
    return vit.norm(x)


@torch.no_grad()
def xavier_linears_(model: nn.Module) -> None:
    """MAE's ``_init_weights``: every linear xavier-uniform with zero bias, LayerNorms (1, 0)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def sincos_pos_embed_(vit: nn.Module) -> None:
    """Set ``vit.pos_embed`` to the fixed 2-D sine-cosine table (zeros at the class tokens, as
    the official code) and freeze it."""
    grid_h, grid_w = vit.patch_embed.grid_size
    prefix = vit.pos_embed.shape[1] - grid_h * grid_w
    table = sincos_position_table(grid_h, grid_w, vit.pos_embed.shape[-1])
    with torch.no_grad():
        vit.pos_embed[0, :prefix].zero_()
        vit.pos_embed[0, prefix:].copy_(table)
    vit.pos_embed.requires_grad_(False)


class MAEDecoder(nn.Module):
    """Embed the visible latents, fill the masked places with one learned mask token, add fixed
    sine-cosine positions, run a few transformer blocks, predict each patch's pixels.

    ``x = [prefix, unshuffle([W_e z_visible, m, ..., m])] + pos``; ``pred = W_p LN(blocks(x))``.
    """

    def __init__(self, encoder_dim: int, dim: int, depth: int, heads: int, patch_pixels: int,
                 prefix_tokens: int, mlp_ratio: float = 4.0, io_init: str = "xavier"):
        super().__init__()
        if io_init not in ("xavier", "torch"):
            raise ValueError(f"decoder io_init must be 'xavier' or 'torch', got {io_init!r}")
        self.io_init = io_init
        self.prefix_tokens = prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[
            # our softmax layer: timm's, plus the explicit path under CPU autocast
            Block(dim, heads, mlp_ratio, qkv_bias=True, attn_layer=SoftmaxAttention)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: xavier-uniform linears, zero biases, N(0, 0.02) mask token.

        With ``io_init="torch"`` the input embedding and the pixel prediction keep torch's
        ``nn.Linear`` default instead (as lightly 1.6's MAE example leaves them): at the B1
        budget this lifts the class token's k-NN by several points (README, B1 peers).
        """
        nn.init.normal_(self.mask_token, std=0.02)
        xavier_linears_(self)
        if self.io_init == "torch":
            self.embed.reset_parameters()
            self.pred.reset_parameters()

    def forward(self, latent: torch.Tensor, restore_idx: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """``latent (B, prefix + K, D)``, ``restore_idx (B, N)`` -> ``(B, N, patch_pixels)``."""
        x = self.embed(latent)
        prefix, visible = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        batch, tokens = restore_idx.shape
        masked = self.mask_token.to(x.dtype).expand(batch, tokens - visible.shape[1], -1)
        patches = gather_tokens(torch.cat([visible, masked], dim=1), restore_idx)
        pos = sincos_position_table(*grid, x.shape[-1]).to(x.device, x.dtype)
        x = torch.cat([prefix, patches + pos], dim=1)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.prefix_tokens :])
