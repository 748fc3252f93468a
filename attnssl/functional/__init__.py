"""Pure tensor maths: no parameters, no state; each function is tested against a reference."""

from attnssl.functional.distributed import gather_with_grad
from attnssl.functional.info_nce import nt_xent

__all__ = ["gather_with_grad", "nt_xent"]
