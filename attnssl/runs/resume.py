"""The resume policy, the same for every entry point (the CLI, ``pretrain()`` from Python, the
sweep and the benchmarks): a run continues exactly or not at all.

- ``run.resume=auto`` with a fixed ``run.name``: continue from the run folder's newest readable
  checkpoint when there is one, or start fresh;
- a resumed run keeps the settings it was trained with; only those that cannot change its
  trajectory (``attnssl.config.RESUME_OVERRIDABLE``) may differ, any other is refused by name.
"""

from __future__ import annotations

from pathlib import Path

from attnssl.config import Config, ConfigError, config_to_dict, describe_differences, differing_settings
from attnssl.runs.checkpoint import load_training_checkpoint, newest_readable_checkpoint
from attnssl.runs.folder import make_run_dir


def check_same_run(config: Config, checkpoint: Path, trained: dict) -> None:
    """Refuse to continue ``checkpoint`` (trained with ``trained``) under settings that would
    change its trajectory. ``run.out_dir`` is where the folder lives, not a setting: a run
    folder moved elsewhere (a sweep's points moved into a new ``--out``) continues there."""
    changed = differing_settings(config_to_dict(config), trained)
    changed.pop("run.out_dir", None)
    if changed:
        raise ConfigError(
            f"{checkpoint} was trained with other settings: "
            f"{describe_differences(changed)}; a resumed run keeps its own "
            f"(resume it without them), or start another run.name")


def auto_resume_checkpoint(config: Config) -> Path | None:
    """With ``run.resume=auto``: the run folder's newest readable checkpoint (checked to match
    ``config``), or None for a fresh start; None for ``run.resume=never``."""
    if config.run.resume != "auto":
        return None
    if not config.run.name:
        raise ConfigError("run.resume=auto needs a fixed run.name (the folder to continue)")
    found = newest_readable_checkpoint(make_run_dir(config))
    if found is None:
        return None
    check_same_run(config, found, load_training_checkpoint(found, lazy=True)["config"])
    print(f"run.resume=auto: continuing {found}")
    return found
