"""Where a run executes: the machine's description, the accelerator and precision checks, the
multi-process strategy, every process's random state, and the stop signals."""

from __future__ import annotations

import platform
import random
import signal
import threading
import warnings

import torch
from lightning_fabric import Fabric

from attnssl.config import ConfigError
from attnssl.precision import cpu_has_native_bf16


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "cpu_bf16": "native" if cpu_has_native_bf16() else "emulated",
    }


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rank_states(fabric: Fabric, state: dict) -> list[dict]:
    """Every process's RNG/view state, so each can restore its own on resume."""
    if fabric.world_size == 1:
        return [state]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


RUN_DIR_ENV = "ATTNSSL_RUN_DIR"


def is_collective_failure(err: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or any(
        s in text for s in ("gloo", "Connection closed", "Connection reset", "NCCL",
                            "timed out", "Timed out", "Broken pipe"))


def process_count(trainer) -> int:
    """Processes a run asks for: ``trainer.devices`` (a count) times ``trainer.num_nodes``."""
    return (trainer.devices if isinstance(trainer.devices, int) else 1) * trainer.num_nodes


def build_strategy(trainer):
    """``trainer.strategy``; for several processes, DDP with ``trainer.collective_timeout_s``
    so that a process whose peers stopped answering errors out instead of waiting forever."""
    if trainer.strategy == "ddp" or (trainer.strategy == "auto" and process_count(trainer) > 1):
        from datetime import timedelta

        from lightning_fabric.strategies import DDPStrategy

        return DDPStrategy(timeout=timedelta(seconds=trainer.collective_timeout_s))
    return trainer.strategy


def check_accelerator(accelerator: str) -> None:
    """``trainer.accelerator`` names hardware this machine has, or a clear error says what it
    has instead of Lightning's traceback."""
    missing = {"cuda": not torch.cuda.is_available(), "gpu": not torch.cuda.is_available(),
               "mps": not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if missing.get(accelerator, False):
        have = ["cpu", "auto"] + (["cuda"] if torch.cuda.is_available() else [])
        raise ConfigError(f"trainer.accelerator={accelerator}, but this machine has no such "
                          f"device; accepted here: {', '.join(have)}")


def warn_if_bf16_is_emulated(precision: str, device: torch.device) -> None:
    """A clear warning when a bf16 precision is asked for on a CPU that would emulate it."""
    if device.type == "cpu" and precision in ("bf16-mixed", "16-mixed") \
            and not cpu_has_native_bf16():
        warnings.warn(
            f"trainer.precision={precision} on a CPU without AVX-512 BF16 or AMX: bf16 is "
            "emulated here and trains many times slower than fp32 (19 against 278 images/s "
            "for B1 MAE on an AVX2-only CPU); set trainer.precision=32", RuntimeWarning,
            stacklevel=3)


class StopSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before they
    kill) ask the loop to stop after the current step; it then saves a checkpoint and returns,
    so no finished step is lost. A second signal acts as usual. Only in the main thread."""

    SIGNALS = ("SIGINT", "SIGTERM")
    # a stop that arrived in this process outside training (a sweep worker records it there):
    # the next training stops after its first step
    asked: str | None = None

    def __init__(self):
        self.received: str | None = StopSignals.asked
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for name, handler in self._previous.items():  # a second signal is not caught
            signal.signal(getattr(signal, name), handler)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()
