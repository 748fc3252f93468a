"""CBSA with learned representatives: an ablation of CBSA's pooling.

CBSA (QishuaiWen/CBSA, :class:`attnssl.nn.attention.CBSAAttention`) starts its ``m``
representatives from the tokens, ``R0 = P W`` with ``P`` an average pooling of the patch grid.
Here ``R0`` is a learned parameter per head, ``(h, m, p)`` with ``m = cbsa_pool^2``
(initialised N(0, std^2), ``std = model.cbsa_learned_std``, 0.02 by default as timm
initialises its extra tokens), the same for every image;
the rest is CBSA's: ``A = softmax(R0 W^T scale)``, ``R = R0 + s_rep A W``, ``C = softmax(R R^T
scale) R``, ``out = to_out(concat_h s_x A^T C)``. No patch grid is needed, and ``m`` is not
capped by it. The paper argues that pooled representatives keep the attention's rank, which
learned ones need not; ``benchmarks/experiments.py cbsa-representatives`` measures it.

The start's scale matters here, unlike for a Perceiver's latents, which pass a LayerNorm and a
projection before they attend: ``R0`` meets the tokens ``W`` directly, so the extraction's
logits are of order ``std |w| sqrt(p) scale``. Pooled representatives ``P W`` grow with ``W``
as the projection trains; learned ones move only by their own updates, which under AdamW are of
the size of the learning rate whatever the gradient. In B1's first block at initialisation the
logits' standard deviation is 0.004 at std 0.02, 0.04 for pooled representatives and 0.22 at
std 1: at 0.02 the extraction is uniform (rank 1, a mean of the tokens) and a short run does not
take it away (section 10 of docs/experiments.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnssl.functional.cbsa import cbsa_from_representatives
from attnssl.nn.attention import CBSAAttention, register_attention


@register_attention("cbsa_learned")
class CBSALearnedAttention(CBSAAttention):
    """CBSA whose initial representatives are learned, ``m = pool_side^2`` of them per head
    (CBSA's ``__init__`` sets 8, ``build_vit`` then ``model.cbsa_pool``; each setting makes
    the parameter afresh, N(0, ``representatives_std``^2), which ``build_vit`` sets first from
    ``model.cbsa_learned_std``)."""

    representatives_std = 0.02

    @property
    def pool_side(self) -> int:
        return self._pool_side

    @pool_side.setter
    def pool_side(self, side: int) -> None:
        self._pool_side = side
        self.representatives = nn.Parameter(
            torch.randn(self.num_heads, side * side, self.head_dim) * self.representatives_std)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs):
        if attn_mask is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention mask")
        w = self.split_heads(self.proj(x))
        rep = self.representatives.to(w.dtype).unsqueeze(0)
        out, extraction = cbsa_from_representatives(w, rep, self.step_rep, self.step_x,
                                                    self.scale, contract=self.contract)
        if self.record_attention:
            self.attention_maps = (extraction.transpose(-2, -1) @ extraction).detach()
        return self.to_out(self.merge_heads(out))
