"""Efficient attention (Shen et al., WACV 2021, "Efficient Attention: Attention with Linear
Complexities").

Per head, the queries are normalised over their features and the keys over the positions,

    rho_q(Q)_i = softmax_d(q_i)        rho_k(K)_:d = softmax_j(k_jd)
    out = rho_q(Q) (rho_k(K)^T V)

which costs ``O(N d^2)``; its implicit attention map ``rho_q(Q) rho_k(K)^T`` has rows that sum
to 1, and is what the layer records. Follows the official code,
github.com/cmsflash/efficient-attention (``efficient_attention.py``: no scale), without its
residual connection, which the transformer block already adds. The layer keeps timm's ``qkv``
and ``proj``, so weights load from and into a softmax backbone.
"""

from __future__ import annotations

import torch
from timm.layers import Attention

from attnssl.nn.attention import register_attention


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, d)`` queries, keys, values -> ``(B, h, N, d_v)``."""
    context = k.softmax(dim=-2).transpose(-2, -1) @ v  # (B, h, d, d_v)
    return q.softmax(dim=-1) @ context


def efficient_attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``rho_q(Q) rho_k(K)^T``, ``(B, h, N, N)``."""
    return q.softmax(dim=-1) @ k.softmax(dim=-2).transpose(-2, -1)


@register_attention("efficient")
class EfficientAttention(Attention):
    """``model.attention=efficient``: :func:`efficient_attention` on timm's projections."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_attention = False
        self.attention_maps: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs):
        if attn_mask is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention mask")
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.record_attention:
            self.attention_maps = efficient_attention_map(q, k).detach()
        out = self.attn_drop(efficient_attention(q, k, v))
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))
