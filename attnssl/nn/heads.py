"""Heads put on top of the backbone's features."""

from __future__ import annotations

import torch.nn as nn


class ProjectionHead(nn.Sequential):
    """SimCLR's projector: ``layers`` linear maps, each but the last followed by BN and ReLU.

    ``g(h) = W_L ... ReLU(BN(W_1 h))`` (Chen et al. 2020, 2-layer MLP by default).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2,
                 batchnorm: bool = True):
        modules: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        for k in range(layers):
            last = k == layers - 1
            modules.append(nn.Linear(dims[k], dims[k + 1], bias=not (batchnorm and not last)))
            if not last:
                if batchnorm:
                    modules.append(nn.BatchNorm1d(dims[k + 1]))
                modules.append(nn.ReLU(inplace=True))
        super().__init__(*modules)


class MLPProjector(nn.Sequential):
    """BAM's projector (the official ``MlpProjHead`` as its ViT scripts set it): no batch norm.

    ``g(h) = W_L GELU(... GELU(W_1 h + b_1) ...) + b_L``; weights truncated-normal (std 0.02),
    biases zero.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3):
        modules: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        for k in range(layers):
            modules.append(nn.Linear(dims[k], dims[k + 1]))
            if k < layers - 1:
                modules.append(nn.GELU())
        super().__init__(*modules)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
