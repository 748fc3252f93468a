"""Loss modules: hyper-parameters and state around the maths in ``attnssl.functional``."""

from attnssl.losses.bam import BAMLoss
from attnssl.losses.dino import DINOLoss
from attnssl.losses.ntxent import NTXentLoss
from attnssl.losses.udi import UDILoss

__all__ = ["BAMLoss", "DINOLoss", "NTXentLoss", "UDILoss"]
