"""Heads put on top of the backbone's features."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from attnssl.nn.global_batch_norm import GlobalBatchNorm1d


class ProjectionHead(nn.Sequential):
    """SimCLR's projector: ``layers`` linear maps, each but the last followed by BN and ReLU.

    ``g(h) = W_L ... ReLU(BN(W_1 h))`` (Chen et al. 2020, 2-layer MLP by default). With
    ``last_batchnorm`` the output is ``gamma * BN(W_L h)``: no bias, a batch norm that learns a
    scale but no shift. That is the official code's head (``ProjectionHead`` in
    github.com/google-research/simclr, whose last ``LinearLayer`` has ``use_bn=True,
    use_bias=False``); the paper's description has no output batch norm, and neither do we by
    default. The batch norms are global (:class:`GlobalBatchNorm1d`): over every process's
    rows, as SimCLR's.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2,
                 batchnorm: bool = True, last_batchnorm: bool = False):
        modules: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        for k in range(layers):
            last = k == layers - 1
            normed = last_batchnorm if last else batchnorm
            modules.append(nn.Linear(dims[k], dims[k + 1], bias=not normed))
            if normed:
                modules.append(GlobalBatchNorm1d(dims[k + 1], shift=not last))
            if not last:
                modules.append(nn.ReLU(inplace=True))
        super().__init__(*modules)


class MLPProjector(nn.Sequential):
    """BAM's projector (the official ``MlpProjHead``, github.com/DanielShalam/BAM
    ``models/heads.py``).

    ``g(h) = W_L a(... a(W_1 h + b_1) ...) + b_L`` with GELU ``a``; with ``batchnorm`` each
    hidden layer is ``a(BN(W_k h + b_k))``, and with ``last_batchnorm`` too the output is
    ``BN(W_L h + b_L)`` without learned scale and shift. The official code's defaults put both
    batch norms in; its ViT scripts turn both off (``--proj_use_bn false --proj_last_bn
    false``), and so do we by default. The batch norms are global
    (:class:`GlobalBatchNorm1d`), as the official code's ``SyncBatchNorm``. Weights
    truncated-normal (std 0.02), biases zero.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3,
                 batchnorm: bool = False, last_batchnorm: bool = False):
        if last_batchnorm and not batchnorm:
            raise ValueError("last_batchnorm needs batchnorm (as the official MlpProjHead)")
        modules: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        for k in range(layers):
            modules.append(nn.Linear(dims[k], dims[k + 1]))
            if k < layers - 1:
                if batchnorm:
                    modules.append(GlobalBatchNorm1d(dims[k + 1]))
                modules.append(nn.GELU())
            elif last_batchnorm:
                modules.append(GlobalBatchNorm1d(dims[k + 1], affine=False))
        super().__init__(*modules)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """DINO's head (github.com/facebookresearch/dino ``DINOHead``), shared by DINO and UDI.

    ``g(h) = W_last normalize(MLP(h))``: an MLP ``in -> hidden -> ... -> bottleneck`` with GELU
    (and BN if asked), the L2-normalised bottleneck, then a weight-normalised linear layer
    without bias, ``W_last[k] = g_k v_k / ||v_k||``. With ``norm_last_layer`` the scales
    ``g_k`` stay fixed at 1 (the rows are unit vectors); otherwise they are learned. The MLP is
    initialised truncated-normal (std 0.02), the last layer with torch's default, as the
    official code does.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, layers: int = 3, norm_last_layer: bool = True,
                 batchnorm: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        modules: list[nn.Module] = []
        for k in range(layers):
            modules.append(nn.Linear(dims[k], dims[k + 1]))
            if k < layers - 1:
                if batchnorm:
                    modules.append(GlobalBatchNorm1d(dims[k + 1]))
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            scale.fill_(1.0)
        scale.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = self.mlp(x.reshape(-1, shape[-1]))
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x).reshape(*shape[:-1], -1)
