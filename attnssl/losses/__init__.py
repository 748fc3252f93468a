"""Loss modules: hyper-parameters and state around the maths in ``attnssl.functional``."""

from attnssl.losses.bam import BAMLoss
from attnssl.losses.ntxent import NTXentLoss

__all__ = ["BAMLoss", "NTXentLoss"]
