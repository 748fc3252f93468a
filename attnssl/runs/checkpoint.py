"""Checkpoints written atomically and loaded safely.

A checkpoint is written to a temporary file in the same folder, flushed to disk (``fsync``) and
renamed over the final name, and the folder entry is synced too, so a crash at any moment leaves
either the previous file or the new one, never a torn file. Loading always uses
``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)\.ckpt$")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsynced and renamed over
    ``path`` and the folder entry synced, so ``path`` is always the old file or the whole new
    one. On failure the temporary file is removed and the old file is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file 0600; give it the mode any new file of this process gets
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's writer reports a failed write (full disk) so
            free = shutil.disk_usage(tmp.parent).free / 2**20
            raise OSError(f"the write failed ({err}); {free:.0f} MB free on that disk") from err

    atomic_write(path, write)


def safe_torch_load(path: str | Path, *, lazy: bool = False) -> Any:
    """``torch.load`` with ``weights_only``. ``lazy`` memory-maps the tensors instead of reading
    them: only the small pickle and the zip directory are read, so checking a checkpoint or
    reading its config costs milliseconds however large it is. It refuses a truncated file just
    as a full read does (torch checks no checksums on either path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except pickle.UnpicklingError as err:
        # torch's own text advises weights_only=False, which would run the file's code
        raise pickle.UnpicklingError(
            f"{path} holds pickled objects other than tensors and plain data (code could run "
            f"when it is loaded), so it was not loaded. attnssl reads only weights; use a "
            f"checkpoint written by attnssl") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"{path} is not a readable checkpoint (damaged, truncated, or not written by "
            f"torch.save's zip format: {str(err).splitlines()[0][:160]}); give a run folder or "
            f"one of its checkpoints/step-N.ckpt files") from err


TRAINING_KEYS = ("method", "optimizer", "train", "ranks", "config")


def load_training_checkpoint(path: str | Path, *, lazy: bool = False) -> dict:
    """A checkpoint written by the trainer; anything else is named and refused. ``lazy``: see
    ``safe_torch_load`` (for its config, or to check it before Fabric reads it whole)."""
    state = safe_torch_load(path, lazy=lazy)
    missing = [k for k in TRAINING_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(
            f"{path} is not an attnssl training checkpoint (missing {', '.join(missing)}); "
            f"give a run folder or one of its checkpoints/step-N.ckpt files"
        )
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Fabric checkpoint plugin: atomic writes, ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_torch_load(path)


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.search(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's step checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*.ckpt")), key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; drop temporaries a killed save left behind."""
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in (Path(run_dir) / "checkpoints").glob(".step-*.tmp"):
        stale.unlink(missing_ok=True)


UNREADABLE = (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError,
              zipfile.BadZipFile)


def newest_readable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run folder that loads as a training checkpoint; newer ones
    that do not (truncated or damaged after they were written) are named on stderr and passed
    over."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            load_training_checkpoint(path, lazy=True)
            return path
        except UNREADABLE as err:
            print(f"passing over unreadable checkpoint {path}: {err}", file=sys.stderr)
    return None


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A checkpoint file, or a run folder's newest readable checkpoint."""
    path = Path(run_or_checkpoint)
    if path.is_file():
        return path
    if path.is_dir():
        found = newest_readable_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"run folder {path} has no readable checkpoints (expected "
                f"{path}/checkpoints/step-N.ckpt)"
            )
        return found
    raise FileNotFoundError(f"{path} is neither a checkpoint file nor a run folder")
