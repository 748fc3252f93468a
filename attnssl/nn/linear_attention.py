"""Linear attention (Katharopoulos et al., ICML 2020, "Transformers are RNNs"), non-causal.

With the feature map ``phi(x) = elu(x) + 1`` applied to each head's queries and keys,

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)

costs ``O(N d^2)`` per head instead of ``O(N^2 d)``: the sum over keys is taken once. Its
attention map, ``A_ij = phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j')``, is what the layer
records. Follows the official code, github.com/idiap/fast-transformers
(``attention/linear_attention.py``: no ``1/sqrt(d)`` scale, ``eps = 1e-6`` in the normaliser).
The layer keeps timm's ``qkv`` and ``proj`` (and their norms), so weights load from and into a
softmax backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnssl.nn.attention import QKVAttention, register_attention

EPS = 1e-6


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1``, positive everywhere."""
    return F.elu(x) + 1


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     eps: float = EPS) -> torch.Tensor:
    """``(B, h, N, d)`` queries, keys, values -> ``(B, h, N, d_v)``, as the module docstring."""
    q, k = elu_feature_map(q), elu_feature_map(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)) + eps
    return torch.einsum("bhnd,bhde->bhne", q, kv) / normaliser.unsqueeze(-1)


def linear_attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``A = phi(Q) phi(K)^T`` with rows normalised, ``(B, h, N, N)``."""
    sim = elu_feature_map(q) @ elu_feature_map(k).transpose(-2, -1)
    return sim / sim.sum(dim=-1, keepdim=True)


@register_attention("linear")
class LinearAttention(QKVAttention):
    """``model.attention=linear``: :func:`linear_attention` on timm's projections."""

    def attend(self, q, k, v, want_map):
        attn = linear_attention_map(q, k) if want_map else None
        with torch.autocast(q.device.type, enabled=False):  # the normaliser is a long sum
            return linear_attention(q.float(), k.float(), v.float()).to(v.dtype), attn
