"""A run on disk, owned in one place: its folder, checkpoints, step metrics, and reading it back.

A run folder ``run.out_dir/run.name/`` holds:

- ``config.yaml``: the validated configuration it was started with;
- ``checkpoints/step-NNNNNNNN.ckpt``: written atomically, the newest ``keep_checkpoints``
  kept (:mod:`attnssl.runs.checkpoint`);
- ``metrics.csv``: one row per logged step, cut back to the checkpoint on resume
  (:mod:`attnssl.runs.metrics_log`);
- ``metrics.json``, ``backbone.safetensors``, ``loss_curve.png``: written at the end;
- ``eval-step-N.json``: each later evaluation, never overwriting an earlier one;
- ``.lock``: held while a process writes the folder (:mod:`attnssl.runs.folder`).

The trainer writes it; evaluation, export, analysis and the sweep read it through this layer
(:mod:`attnssl.runs.trained`), which imports nothing above the configuration.
"""
