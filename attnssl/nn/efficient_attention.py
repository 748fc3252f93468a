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

from attnssl.nn.attention import QKVAttention, register_attention


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, d)`` queries, keys, values -> ``(B, h, N, d_v)``."""
    context = k.softmax(dim=-2).transpose(-2, -1) @ v  # (B, h, d, d_v)
    return q.softmax(dim=-1) @ context


def efficient_attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``rho_q(Q) rho_k(K)^T``, ``(B, h, N, N)``."""
    return q.softmax(dim=-1) @ k.softmax(dim=-2).transpose(-2, -1)


@register_attention("efficient")
class EfficientAttention(QKVAttention):
    """``model.attention=efficient``: :func:`efficient_attention` on timm's projections."""

    def attend(self, q, k, v, want_map):
        attn = efficient_attention_map(q, k) if want_map else None
        return self.attn_drop(efficient_attention(q, k, v)), attn
