"""Which numeric precision a run uses: ``trainer.precision=auto`` picks bf16 where it is native.

bf16-mixed pays only where the hardware computes bf16 matmuls: a GPU with bf16 support, or a
CPU with AVX-512 BF16 or AMX tiles. Elsewhere oneDNN emulates bf16 and autocast costs instead
of pays (B1 MAE on a 2-core AMD EPYC Zen 3, AVX2 only: 19 images/s under bf16-mixed against
278 in fp32; SimCLR on a 2-core AMD EPYC Zen 4 with AVX-512 BF16: 346 against 148).
"""

from __future__ import annotations

import torch

AUTO = "auto"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX-512 BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def accelerator_type(accelerator: str) -> str:
    """The device type ``trainer.accelerator`` stands for (``auto``: cuda when present)."""
    if accelerator in ("cuda", "gpu"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> ``bf16-mixed`` on a device that runs bf16 natively, else ``32``; any
    other value is returned as it is.

    Native: a CUDA device with bf16 support (``torch.cuda.is_bf16_supported``), or a CPU with
    AVX-512 BF16 or AMX. MPS and everything else get ``32``."""
    if precision != AUTO:
        return precision
    if device_type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    elif device_type == "cpu":
        native = cpu_has_native_bf16()
    else:
        native = False
    return "bf16-mixed" if native else "32"
