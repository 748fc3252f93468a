"""Transformer blocks beside timm's: the CBT block of the CBSA paper (QishuaiWen/CBSA,
``CBSA_image_classification/models.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath


def ista_step(x: torch.Tensor, dictionary: torch.Tensor, step_size: float,
              sparsity: float) -> torch.Tensor:
    """One ISTA step towards a sparse code of ``x`` in the dictionary ``D``:
    ``ReLU(x + eta (D^T x - D^T D x) - eta lambda)`` (rows of ``x`` are tokens; ``D x`` is
    ``F.linear(x, D)``)."""
    reconstruction = F.linear(F.linear(x, dictionary), dictionary.t())
    return F.relu(x + step_size * (F.linear(x, dictionary.t()) - reconstruction)
                  - step_size * sparsity)


class ISTA(nn.Module):
    """The CBT block's second half: one ISTA step with a learned square dictionary ``D``
    (Kaiming-uniform initialised) and fixed ``eta = lambda = 0.1``, as the official code."""

    def __init__(self, dim: int, step_size: float = 0.1, sparsity: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.step_size, self.sparsity = step_size, sparsity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ista_step(x, self.weight, self.step_size, self.sparsity)


class CBTBlock(nn.Module):
    """``z = x + attn(LN_1(x))``, then ``x = ISTA(LN_2(z))``, with no residual around the ISTA
    step (the official ``Transformer.forward``). Takes timm's ``Block`` arguments so that
    ``VisionTransformer(block_fn=CBTBlock)`` builds a CBT; the MLP arguments are unused.
    ``build_vit`` passes ``nn.LayerNorm`` (eps 1e-5, the official ``PreNorm``'s) where timm's
    default would be eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, proj_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm,
                 attn_layer=None, **_unused):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                               proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                               norm_layer=norm_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.ista = ISTA(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask))
        return self.ista(self.norm2(x))
