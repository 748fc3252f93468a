"""Schedules: a value as a pure function of the step (or epoch), for the loop and the methods."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine from ``peak`` to ``final``.

    ``v(t) = peak * t / T_w`` for ``t < T_w``;
    ``v(t) = final + (peak - final) * (1 + cos(pi * (t - T_w) / (T - T_w))) / 2`` after.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (weight decay, EMA momentum)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_ramp(step: int, ramp_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 moving linearly to ``end`` at ``ramp_steps``, then constant
    (BAM's Sinkhorn eps)."""
    return end if step >= ramp_steps else start + (end - start) * step / ramp_steps


def teacher_temperature(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """DINO's schedule: ``linspace(start, end, warmup_epochs)[epoch]``, then ``end``.

    Stepped per epoch, as the official code indexes its schedule by epoch.
    """
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)
