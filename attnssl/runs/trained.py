"""A trained run read back: its config and the weights of the backbone it evaluates."""

from __future__ import annotations

from attnssl.config import Config, build_config, merge_overrides


def backbone_from_method_state(method_state: dict, prefix: str = "backbone.") -> dict:
    """The backbone's weights out of a method's state dict (keys ``prefix*``)."""
    found = {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}
    if not found:
        raise ValueError(f"checkpoint holds no backbone weights (no '{prefix}*' keys)")
    return found


def config_from_checkpoint(checkpoint: dict, overrides: list[str] | None = None) -> Config:
    """The config a loaded checkpoint was trained with, with ``key=value`` overrides applied."""
    return build_config(merge_overrides(checkpoint["config"], overrides or []))
