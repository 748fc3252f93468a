"""Methods by name: each fits backbone, heads and loss together for one training step.

Every method is one module holding its config section and a :class:`Method` subclass
registered with :func:`register_method` (``attnssl.methods.base`` gives the contract). The
imports below are the registry of the built-in methods: adding a method is a new module and
one line here.
"""

from __future__ import annotations

import torch.nn as nn

from attnssl.data.views import MultiCropViews
from attnssl.methods import bam, dino, ibot, mae, simclr, udi  # noqa: F401  (registers them)
from attnssl.methods.bam import BAM
from attnssl.methods.base import Method, method_class, method_names, register_method
from attnssl.methods.dino import DINO
from attnssl.methods.mae import MAE
from attnssl.methods.simclr import SimCLR
from attnssl.methods.udi import UDI


def build_method(config, backbone: nn.Module) -> Method:
    """The registered ``config.method.name`` around ``backbone``, once its views are checked."""
    cls = method_class(config.method.name)
    cls.check_views(config)
    return cls.build(config, backbone)


def build_views(config, image_size: int, channels: int, mean, std, patch_size: int,
                seed: int) -> MultiCropViews:
    """The method's view maker."""
    return method_class(config.method.name).build_views(config, image_size, channels, mean, std,
                                                        patch_size, seed)


def evaluation_backbone_prefix(method_cfg) -> str:
    """Where the evaluated backbone's weights sit in a method's state dict."""
    return method_class(method_cfg.name).evaluation_prefix(method_cfg)


def evaluation_backbone(method: Method) -> nn.Module:
    return method.evaluation_backbone


__all__ = ["BAM", "DINO", "MAE", "UDI", "Method", "SimCLR", "build_method", "build_views",
           "evaluation_backbone", "evaluation_backbone_prefix", "method_class", "method_names",
           "register_method"]
