"""UDI's network parts: the backbone's tokens before and after the final norm, and the extra
attention layer that turns sampled positions into patch representations (Su & Ji 2024;
official ``vision_transformer.MaskedAttention`` and ``utils.UDIWrapper``, QingSuML/udi).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def vit_tokens(vit: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens after the last block, the same after the final norm)`` of a timm ViT, each
    ``(B, prefix + N, D)``; the second is ``vit.forward_features(images)``. With ``masks (B, H,
    W)``, the patch embeddings there are replaced by ``mask_token`` before positions are added
    (iBOT's masked student)."""
    x = vit.patch_embed(images)  # (B, H, W, D): the backbone takes any image size
    if masks is not None:
        x = torch.where(masks.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return x, vit.norm(x)


class SampledPatchAttention(nn.Module):
    """Patch representations at sampled positions, one attention layer over the patch tokens.

    With ``Z`` the last block's patch tokens (class tokens dropped, before the final norm),
    ``Z' = LN_1(Z)`` and a row ``m_i`` over the N patches (one-hot for the student, bilinear
    weights for the teacher):

        q_i = m_i^T (Z' W_q + b_q),  K = Z' W_k + b_k,  V = Z' W_v + b_v      (per head)
        zhat_i = LN_2( W_o softmax(q_i K^T / sqrt(d_h)) V + b_o + m_i^T Z' )

    A zero row ``m_i`` (a sample outside the view) gives ``q_i = 0``, uniform attention; such
    rows are masked out of the losses. Weights truncated-normal (std 0.02), biases zero.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"patch attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        for module in (self.qkv, self.proj):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, patch_tokens: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``patch_tokens (B, N, D)``, ``maps (M, B, S, N)`` -> ``(M, B, S, D)``."""
        batch, n_patches, dim = patch_tokens.shape
        heads = self.num_heads
        z = self.norm1(patch_tokens)
        q, k, v = self.qkv(z).view(batch, n_patches, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        maps = maps.to(z.dtype)
        q = maps.unsqueeze(2) @ q  # (M, B, h, S, d)
        attention = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attention @ v).transpose(2, 3).flatten(-2)  # (M, B, S, D)
        return self.norm2(self.proj(out) + maps @ z)
