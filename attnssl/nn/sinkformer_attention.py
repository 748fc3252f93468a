"""Sinkformer attention (Sander et al., AISTATS 2022, "Sinkformers: Transformers with Doubly
Stochastic Attention").

Per head, the softmax attention's kernel ``K = exp(Q K^T / sqrt(d))`` is balanced by Sinkhorn's
algorithm towards a doubly stochastic matrix: starting from softmax's row normalisation, each
of ``iters`` rounds normalises the columns, then the rows (in the log domain),

    log A <- log A - logsumexp_i log A        (columns)
    log A <- log A - logsumexp_j log A        (rows)

so ``iters=0`` is softmax attention and every returned row sums to 1, while the columns
approach 1 as the rounds grow. The official code (github.com/michaelsdr/sinkformers,
``SinkhornDistance`` with ``eps=1``) runs the same balancing from the unnormalised kernel
and stops after a column step, then rescales by N; we end on a row step so that each query's
weights stay a distribution and zero rounds give softmax exactly. BAM's Sinkhorn
(``attnssl.functional.bam.sinkhorn``) balances one 2-D matrix across processes; this one
balances every (image, head) matrix at once. The layer keeps timm's ``qkv`` and ``proj``.
"""

from __future__ import annotations

import torch

from attnssl.nn.attention import QKVAttention, register_attention


def sinkhorn_attention(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """``(..., N, N)`` attention logits -> the balanced attention map (rows sum to 1)."""
    log_attn = logits.log_softmax(dim=-1)
    for _ in range(iters):
        log_attn = log_attn - log_attn.logsumexp(dim=-2, keepdim=True)
        log_attn = log_attn - log_attn.logsumexp(dim=-1, keepdim=True)
    return log_attn.exp()


@register_attention("sinkformer")
class SinkformerAttention(QKVAttention):
    """``model.attention=sinkformer``: ``out = proj(sinkhorn_attention(Q K^T / sqrt(d)) V)``
    with ``sinkhorn_iters`` rounds of balancing (3, our choice)."""

    sinkhorn_iters = 3

    def attend(self, q, k, v, want_map):
        with torch.autocast(q.device.type, enabled=False):  # repeated normalisations
            attn = sinkhorn_attention((q.float() * self.scale) @ k.float().transpose(-2, -1),
                                      self.sinkhorn_iters).to(v.dtype)
        return self.attn_drop(attn) @ v, attn
