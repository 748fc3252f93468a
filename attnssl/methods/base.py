"""The method contract and its registry.

A method is one file: its config section (a :class:`~attnssl.settings.MethodSection` with
``name: Literal["..."]``), and a :class:`Method` subclass decorated with
:func:`register_method`. The configuration, the trainer, the evaluation and the export find
everything they need through the registry: the section that validates ``method:``, the views
the method needs, the class tokens of its backbone, the backbone to evaluate and where its
weights sit in a checkpoint.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from attnssl.data.views import MultiCropViews
from attnssl.settings import MethodSection


class Method(nn.Module):
    """A backbone, its heads and its loss for one training step.

    ``forward(views, **extra)`` takes the list of view batches (and the view maker's
    ``extra_inputs()``, such as UDI's sampled patches) and returns a dict with ``loss`` and any
    scalar tensors worth logging. The trainer calls the hooks around each step:

    * ``before_step(step, steps_per_epoch, total_steps)``: set the method's own schedules;
    * ``before_optimizer_step()``: after clipping (DINO drops the last layer's gradients);
    * ``after_step(step, total_steps)``: after the optimiser step (an EMA teacher update).
    """

    name: ClassVar[str]
    Section: ClassVar[type[MethodSection]]
    class_tokens: ClassVar[int] = 1
    """class tokens the backbone needs (UDI: 2); ``model.class_tokens`` defaults to it."""

    backbone: nn.Module

    @classmethod
    def check_views(cls, config) -> None:
        """Raise ``ValueError`` naming the setting when ``config.views`` (or the batch) cannot
        feed this method. The default needs two views of each image."""
        views = config.views
        if views.global_crops + views.local_crops < 2:
            raise ValueError(f"{cls.name} needs at least 2 views: raise views.global_crops or "
                             f"views.local_crops")

    @classmethod
    def build(cls, config, backbone: nn.Module) -> Method:
        """The method around ``backbone`` for ``config`` (views already checked)."""
        return cls(backbone, config.method, config.views.global_crops, config.views.local_crops)

    @classmethod
    def build_views(cls, config, image_size: int, channels: int, mean, std, patch_size: int,
                    seed: int) -> MultiCropViews:
        """The view maker; the default is the multi-crop one every method but UDI shares."""
        return MultiCropViews(config.views, image_size, channels, mean, std, seed)

    @classmethod
    def evaluation_prefix(cls, section: MethodSection) -> str:
        """Where :attr:`evaluation_backbone`'s weights sit in the method's state dict."""
        return "backbone."

    @property
    def evaluation_backbone(self) -> nn.Module:
        """The backbone that is evaluated and exported."""
        return self.backbone

    def before_step(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        pass

    def before_optimizer_step(self) -> None:
        pass

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def forward(self, views: list[torch.Tensor], **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``method.name=<cls.name>`` build ``cls``, validated by
    ``cls.Section`` (whose ``name`` field must default to the same name)."""
    section_name = cls.Section.model_fields["name"].default
    if section_name != cls.name:
        raise TypeError(f"{cls.__name__}.Section's name defaults to {section_name!r}, the method "
                        f"is registered as {cls.name!r}")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered "
                         f"({_METHODS[cls.name].__qualname__})")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    """The registered method called ``name``; an unknown name lists the accepted ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown method.name {name!r}; accepted: {', '.join(_METHODS)}")
    return _METHODS[name]
