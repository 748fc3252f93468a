"""Loss modules: hyper-parameters and state around the maths in ``attnssl.functional``."""

from attnssl.losses.ntxent import NTXentLoss

__all__ = ["NTXentLoss"]
