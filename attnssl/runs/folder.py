"""A run on disk: where its folder is, a name that cannot collide or escape, and a lock.

- ``run.name`` is one folder name under ``run.out_dir`` (checked by the config: no ``/``,
  ``..`` or hidden names), so a run cannot write outside the run root;
- a run without a name gets ``METHOD-DATASET-YYYYmmdd-HHMMSS``, and the folder is created
  exclusively: two runs started in the same second get ``...-2``, ``...-3``;
- while a run writes its folder it holds an exclusive lock on ``RUN/.lock`` (``fcntl.flock``,
  released by the kernel when the process ends, however it ends), so a second run into the
  same folder stops at once with the holder's process id instead of mixing its checkpoints and
  ``metrics.csv`` with the first's;
- evaluation results are written under a name not yet taken (``eval-step-N.json``, then
  ``eval-step-N-2.json``, ...), so a second evaluation never overwrites the first.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from attnssl.config import ConfigError


def run_folder_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/step-N.ckpt``), or ``None``
    for a checkpoint file kept anywhere else."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "config.yaml").is_file():
        return checkpoint.parent.parent
    return None


def new_run_folder(out_dir: str | Path, stem: str) -> Path:
    """Create and return a folder ``out_dir/stem-TIMESTAMP`` that did not exist before."""
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = Path(out_dir) / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free run folder name {base}-N in {out_dir}")


class RunFolderBusy(ConfigError):
    """Another process holds the run folder: a state of the machine, not a fault of the run's
    settings, so a sweep does not record it as the point's error."""


class RunFolderLock:
    """Exclusive use of a run folder by one process while it trains there."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._handle = None

    def acquire(self) -> RunFolderLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.run_dir / ".lock", "a+")  # noqa: SIM115 - held while training
        except OSError as err:
            raise ConfigError(f"cannot write the run folder {self.run_dir}: "
                              f"{err.strerror or err}; choose a writable run.out_dir") from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderBusy(
                f"run folder {self.run_dir} is in use by {holder}; wait for that run to end, "
                f"or choose another run.name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {os.uname().nodename}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the lock
            self._handle = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def unused_result_path(folder: Path, stem: str, suffix: str = ".json") -> Path:
    """``folder/stem.json``, or ``stem-2.json``, ``stem-3.json``, ... : the first name that is
    free, reserved by creating it empty (exclusive create), so nothing is overwritten."""
    for attempt in range(1, 10_000):
        path = folder / (f"{stem}{suffix}" if attempt == 1 else f"{stem}-{attempt}{suffix}")
        try:
            with open(path, "x"):
                return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name {stem}-N{suffix} in {folder}")


def make_run_dir(config) -> Path:
    """``run.out_dir/run.name``; without a name, a new folder ``METHOD-DATASET-TIMESTAMP``
    (created here, so two runs started in the same second get two folders)."""
    if config.run.name:
        return Path(config.run.out_dir) / config.run.name
    return new_run_folder(config.run.out_dir, f"{config.method.name}-{config.data.dataset}")
