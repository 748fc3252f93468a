"""Pretraining on Lightning Fabric: one loop for every method, device and precision.

The loop owns what every method shares: data order, views, optimiser, schedules, clipping,
checkpoints, resume, logging and the final evaluation. A method (``attnssl.methods.base``) owns
only its forward pass and loss, and the hooks the loop calls around each step (its own
schedules, an EMA teacher update).

Resume is exact: a checkpoint holds the model (teacher and loss state included), optimiser,
grad scaler, step, epoch and position in the epoch, and every process's RNG and view-generator
state; batches of an epoch follow a seeded permutation, so the resumed run sees the same
batches and the same views as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from lightning_fabric import Fabric
from torch.profiler import record_function

from attnssl.config import Config, ConfigError, config_to_dict
from attnssl.data.datasets import BadImageError, load_dataset
from attnssl.data.loader import BatchLoader, epoch_batches
from attnssl.data.views import MultiCropViews
from attnssl.errors import RunStopped
from attnssl.eval.evaluate import (
    backbone_image_size,
    dataset_spec,
    evaluate_backbone,
    load_eval_splits,
)
from attnssl.export import init_from_export
from attnssl.functional.schedules import cosine, warmup_cosine
from attnssl.methods import build_method, build_views, evaluation_backbone
from attnssl.nn.vit import build_vit, compile_blocks, resolve_size
from attnssl.precision import accelerator_type, resolve_precision
from attnssl.runs.checkpoint import (
    AtomicCheckpointIO,
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
)
from attnssl.runs.folder import (
    RunFolderLock,
    make_run_dir,
    new_run_folder,
    run_folder_of_checkpoint,
)
from attnssl.runs.metrics_log import MetricsLog
from attnssl.runs.resume import auto_resume_checkpoint, check_same_run
from attnssl.train.environment import (
    RUN_DIR_ENV,
    StopSignals,
    build_strategy,
    check_accelerator,
    gather_rank_states,
    is_collective_failure,
    rng_state,
    set_rng_state,
    warn_if_bf16_is_emulated,
)
from attnssl.train.optimisation import build_optimizer, clip_each_parameter
from attnssl.train.outputs import write_run_outputs


@dataclass
class TrainState:
    """Where the run is: optimiser steps done, epoch, batches done in it, and throughput so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # steps whose loss was not finite (trainer.nonfinite_loss=skip)
    precision: str = ""  # what trainer.precision resolved to when the run started (auto)
    threads: int = 0  # torch's intra-op threads when the last checkpoint was written

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _check_local_view_size(views: MultiCropViews, patch: int) -> None:
    """Local crops must tile into patches (``build_vit`` checks the global size)."""
    if views.cfg.local_crops == 0:
        return
    size = views.specs[-1].size
    if size % patch:
        raise ConfigError(
            f"views.local_size is {size}, not a multiple of the patch size {patch}; "
            f"set views.local_size to one (e.g. {max(patch, round(size / patch) * patch)})"
        )


class Pretrainer:
    """Builds everything from a :class:`Config` and runs (or resumes) pretraining."""

    def __init__(self, config: Config, run_dir: Path, resume_from: Path | None = None):
        self.config = config
        self.run_dir = run_dir
        self.resume_from = resume_from
        trainer = config.trainer
        if trainer.num_threads:
            torch.set_num_threads(trainer.num_threads)
        check_accelerator(trainer.accelerator)
        self.precision = self._precision(trainer, resume_from)
        self.fabric = Fabric(
            accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
            strategy=build_strategy(trainer), precision=self.precision,
            plugins=[AtomicCheckpointIO()],
            loggers=self._loggers(),
        )
        warn_if_bf16_is_emulated(self.precision, self.fabric.device)

    @staticmethod
    def _precision(trainer, resume_from: Path | None) -> str:
        """``trainer.precision``, with ``auto`` resolved for this machine; a resumed run keeps
        what its start resolved to, so it continues exactly on a machine that would pick
        otherwise."""
        if trainer.precision != "auto":
            return trainer.precision
        if resume_from is not None:
            started_with = load_training_checkpoint(resume_from, lazy=True)["train"].get("precision")
            if started_with:
                return started_with
        return resolve_precision("auto", accelerator_type(trainer.accelerator))

    def _loggers(self) -> list:
        """TensorBoard where installed; the CSV log is :class:`MetricsLog`."""
        loggers = []
        try:
            import tensorboard  # noqa: F401
            from lightning_fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(root_dir=str(self.run_dir), name="tensorboard",
                                             version=0))
        except ImportError:
            pass
        return loggers

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        fabric, config = self.fabric, self.config
        fabric.launch()
        self.rank, self.world = fabric.global_rank, fabric.world_size
        if config.optim.batch_size % self.world:
            raise ValueError(
                f"optim.batch_size={config.optim.batch_size} must be divisible by the number of "
                f"processes ({self.world})"
            )
        self.batch_per_process = config.optim.batch_size // self.world
        # opened now so that missing or unlabelled splits stop the run before training
        self.eval_splits = load_eval_splits(config) if config.eval.at_end else None
        self.train_set = load_dataset(dataset_spec(config), config.data.train_split)
        mean, std = self.train_set.mean_std
        self.views = build_views(
            config, self.train_set.image_size, self.train_set.channels, mean, std,
            resolve_size(config.model).patch_size, seed=config.run.seed * 1000 + self.rank,
        )
        self.steps_per_epoch = len(
            epoch_batches(len(self.train_set), self.batch_per_process, 0, config.run.seed,
                          self.rank, self.world)
        )
        self.total_steps = self.steps_per_epoch * config.optim.epochs
        self.warmup_steps = round(config.optim.warmup_epochs * self.steps_per_epoch)

        torch.manual_seed(config.run.seed)  # same initial weights as the random-init floor
        backbone = build_vit(config.model, backbone_image_size(config, self.train_set),
                             self.train_set.channels)
        if config.model.init_from is not None and self.resume_from is None:
            init_from_export(backbone, config.model.init_from, config.model)
        _check_local_view_size(self.views, backbone.patch_embed.patch_size[0])
        if config.eval.blocks > len(backbone.blocks):
            raise ConfigError(f"eval.blocks={config.eval.blocks} reads more blocks than the "
                              f"backbone has ({len(backbone.blocks)}); set at most that")
        method = build_method(config, backbone)
        if config.trainer.compile:
            compile_blocks(method)
        if self.world > 1 and fabric.device.type == "cuda":
            # torch's fused global batch norm; elsewhere GlobalBatchNorm1d all-reduces its own
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        optimizer = build_optimizer(method, config.optim)
        self.method, self.optimizer = fabric.setup(method, optimizer)
        self.state = TrainState(precision=self.precision)
        torch.manual_seed(config.run.seed + 1 + self.rank)
        random.seed(config.run.seed + 1 + self.rank)  # Python draws too (iBOT's masks)
        if self.resume_from is not None:
            self._restore(self.resume_from)
        if fabric.is_global_zero and (self.resume_from is None
                                      or not (self.run_dir / "config.yaml").is_file()):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(
                    yaml.safe_dump(config_to_dict(config), sort_keys=False)
                )
            except OSError as err:
                raise RunStopped(
                    f"cannot write the run folder {self.run_dir}: {err.strerror or err}; choose "
                    f"a writable run.out_dir"
                ) from err
        self.metrics_log = MetricsLog(self.run_dir / "metrics.csv") if fabric.is_global_zero else None
        if self.metrics_log is not None:
            self.metrics_log.truncate_after(self.state.step)
        fabric.barrier()

    def _checkpoint_state(self) -> dict:
        return {
            "method": self.method, "optimizer": self.optimizer,
            "precision": self.fabric.strategy.precision, "train": self.state,
        }

    def _restore(self, path: Path) -> None:
        state = self._checkpoint_state()
        remainder = self.fabric.load(path, state)
        # Fabric restores a dataclass into a copy of it: take the restored copy
        self.state = state["train"]
        if len(remainder["ranks"]) != self.world:
            raise ValueError(
                f"{path} was written by {len(remainder['ranks'])} processes; resume it with the "
                f"same number (now {self.world}: trainer.devices x trainer.num_nodes)"
            )
        self._warn_if_not_bit_exact(remainder.get("config", {}).get("trainer", {}))
        rank_state = remainder["ranks"][self.rank]
        set_rng_state(rank_state["rng"])
        self.views.load_state_dict(rank_state["views"])
        self.fabric.print(f"resumed from {path} at step {self.state.step} "
                          f"(epoch {self.state.epoch}, batch {self.state.batch_in_epoch})")

    def _warn_if_not_bit_exact(self, trained: dict) -> None:
        """Another thread count or ``trainer.compile`` changes the order of float sums: the
        resumed run then agrees with an uninterrupted one to the last bits (about 1e-6), not
        bit for bit. Say so when it happens."""
        changes = []
        if self.state.threads and self.state.threads != torch.get_num_threads():
            changes.append(f"{torch.get_num_threads()} threads (the checkpoint was written with "
                           f"{self.state.threads})")
        if "compile" in trained and bool(trained["compile"]) != self.config.trainer.compile:
            changes.append(f"trainer.compile={str(self.config.trainer.compile).lower()} (trained "
                           f"with {str(bool(trained['compile'])).lower()})")
        if changes:
            warnings.warn(
                f"resuming with {' and '.join(changes)}: the run continues, but its weights will "
                f"match an uninterrupted run only to the last bits (float sums in another "
                f"order), not bit for bit", RuntimeWarning, stacklevel=2)

    def save_checkpoint(self) -> Path:
        ranks = gather_rank_states(
            self.fabric, {"rng": rng_state(), "views": self.views.state_dict()}
        )
        self.state.threads = torch.get_num_threads()
        path = self.run_dir / "checkpoints" / f"step-{self.state.step:08d}.ckpt"
        state = self._checkpoint_state()
        state.update(ranks=ranks, config=config_to_dict(self.config))
        previous = latest_checkpoint(self.run_dir)
        try:
            self.fabric.save(path, state)
        except OSError as err:
            raise RunStopped(
                f"could not write checkpoint {path}: {err.strerror or err}. The previous "
                f"checkpoint ({previous or 'none yet'}) is intact: free disk space or make "
                f"{self.run_dir} writable, then continue with --resume {self.run_dir}"
            ) from err
        if self.fabric.is_global_zero:
            prune_checkpoints(self.run_dir, self.config.trainer.keep_checkpoints)
        return path

    # ------------------------------------------------------------------ loop

    def _set_schedules(self) -> tuple[float, float]:
        optim, step = self.config.optim, self.state.step
        lr = warmup_cosine(step, self.total_steps, self.warmup_steps, optim.peak_lr,
                           optim.min_lr)
        wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
        wd = cosine(step, self.total_steps, optim.weight_decay, wd_end)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["apply_wd"] else 0.0
        return lr, wd

    def training_step(self, images: torch.Tensor) -> dict:
        lr, wd = self._set_schedules()
        self.method.module.before_step(self.state.step, self.steps_per_epoch, self.total_steps)
        device = self.fabric.device
        with record_function("step/views"):
            # the uint8 batch goes to the device and the views are made there, batched (their
            # random parameters are drawn on the CPU, so the run is the same on any device)
            views = self.views(images.to(device, non_blocking=True))
            extra = {k: v.to(device) for k, v in self.views.extra_inputs().items()}
        # a skipped step must leave no trace: the forward may update buffers (batch-norm
        # statistics, DINO's centres), so keep a copy to put back
        buffers = ({name: b.clone() for name, b in self.method.named_buffers()}
                   if self.config.trainer.nonfinite_loss == "skip" else None)
        with record_function("step/forward_and_loss"):
            out = self.method(views, **extra)
            loss = out["loss"]
        if not self._all_finite(loss):
            if buffers is not None:
                with torch.no_grad():
                    for name, b in self.method.named_buffers():
                        b.copy_(buffers[name])
            return self._nonfinite_step(loss, lr, wd)
        with record_function("step/backward"):
            self.fabric.backward(loss)
        with record_function("step/optimizer"):
            self._clip_and_step()
        with record_function("step/after_step"):
            self.method.module.after_step(self.state.step, self.total_steps)
        logs = {k: float(v.detach()) for k, v in out.items()}
        logs.update(lr=lr, weight_decay=wd)
        if self.config.trainer.nonfinite_loss == "skip":
            logs["skipped_steps"] = self.state.skipped_steps
        return logs

    def _clip_and_step(self) -> None:
        optim = self.config.optim
        if optim.clip_grad and optim.clip_mode == "per_parameter":
            # the scaler must see the optimiser Fabric steps, not its wrapper
            self.fabric.strategy.precision.unscale_gradients(self.optimizer.optimizer)
            clip_each_parameter(self.method.parameters(), optim.clip_grad)
        elif optim.clip_grad:
            self.fabric.clip_gradients(self.method, self.optimizer, max_norm=optim.clip_grad)
        self.method.module.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite (all of them take the same branch)."""
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:
            finite = self.fabric.all_reduce(finite, reduce_op="min")
        return bool(finite.item())

    def _nonfinite_step(self, loss: torch.Tensor, lr: float, wd: float) -> dict:
        """No update from this step: stop (default) or count it and go on."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.trainer.nonfinite_loss == "stop":
            raise RunStopped(
                f"the loss is not finite ({loss.item()} on process {self.rank}) at step "
                f"{self.state.step}; nothing from that step was applied. Last good checkpoint: "
                f"{latest_checkpoint(self.run_dir) or 'none yet'}. Continue with --resume "
                f"{self.run_dir} trainer.nonfinite_loss=skip to skip such steps, or start again "
                f"with a lower optim.lr"
            )
        self.state.skipped_steps += 1
        self.fabric.print(f"step {self.state.step}: loss {loss.item()}, update skipped "
                          f"({self.state.skipped_steps} so far)")
        return {"loss": float("nan"), "lr": lr, "weight_decay": wd,
                "skipped_steps": self.state.skipped_steps}

    def fit(self) -> dict:
        """Train to the end, or for ``trainer.max_steps`` more steps; returns the run summary.

        In a multi-process run, a collective that fails (a process died, or did not answer
        within ``trainer.collective_timeout_s``) stops this one with :class:`RunStopped`."""
        try:
            with StopSignals() as stop:
                self.stop_signals = stop
                return self._fit()
        except BadImageError as err:
            raise RunStopped(
                f"{err} The run stopped at step {self.state.step}; last checkpoint: "
                f"{latest_checkpoint(self.run_dir) or 'none yet'}. After fixing the data, "
                f"continue with: attnssl pretrain --resume {self.run_dir}") from err
        except RuntimeError as err:
            if self.world == 1 or isinstance(err, RunStopped) or not is_collective_failure(err):
                raise
            raise RunStopped(
                f"process {self.rank} of {self.world} lost contact with the others at step "
                f"{self.state.step} (another process stopped or died: see its output; "
                f"{str(err).splitlines()[0][:200]}). Last checkpoint: "
                f"{latest_checkpoint(self.run_dir) or 'none yet'}; continue with --resume "
                f"{self.run_dir}"
            ) from err

    def _stop_requested(self) -> bool:
        """Whether SIGINT or SIGTERM arrived, on any process (all of them stop together)."""
        received = self.stop_signals.received is not None
        if self.world > 1:
            flag = self.fabric.all_reduce(torch.tensor(float(received)), reduce_op="max")
            if flag.item() and not received:
                self.stop_signals.received = "a signal to another process"
            received = bool(flag.item())
        return received

    def _fit(self) -> dict:
        config, fabric, state = self.config, self.fabric, self.state
        trainer = config.trainer
        stop_at = min(state.step + (trainer.max_steps or self.total_steps), self.total_steps)
        progress = None
        if fabric.is_global_zero and trainer.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=state.step, desc="pretrain",
                            dynamic_ncols=True)
        last_saved = state.step if self.resume_from is not None else -1
        window_images, window_start = 0, time.perf_counter()
        loader = BatchLoader(self.train_set, config.data.num_workers,
                             pin_memory=fabric.device.type == "cuda")
        while state.epoch < config.optim.epochs and state.step < stop_at:
            batches = epoch_batches(len(self.train_set), self.batch_per_process, state.epoch,
                                    config.run.seed, self.rank, self.world)
            remaining = batches[state.batch_in_epoch :]
            for images, _ in loader(remaining):
                started = time.perf_counter()
                logs = self.training_step(images)
                state.train_seconds += time.perf_counter() - started
                state.step += 1
                state.batch_in_epoch += 1
                state.images_seen += config.optim.batch_size
                window_images += config.optim.batch_size
                if state.step % trainer.log_every_steps == 0 or state.step == stop_at:
                    now = time.perf_counter()
                    logs["images_per_second"] = window_images / max(now - window_start, 1e-9)
                    logs["epoch"] = state.epoch
                    fabric.log_dict(logs, step=state.step)
                    if self.metrics_log is not None:
                        self.metrics_log.append(state.step, logs)
                    window_images, window_start = 0, now
                    if progress is not None:
                        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                                             img_s=f"{logs['images_per_second']:.0f}")
                if progress is not None:
                    progress.update(1)
                if state.batch_in_epoch == len(batches):
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    self.save_checkpoint()
                    last_saved = state.step
                elif state.step % trainer.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                    last_saved = state.step
                if state.step >= stop_at or self._stop_requested():
                    break
            if self.stop_signals.received is not None:
                break
        if last_saved != state.step:
            self.save_checkpoint()
        if progress is not None:
            progress.close()
        for logger in fabric.loggers:
            logger.finalize("success")
        return {
            "step": state.step, "total_steps": self.total_steps,
            # what Fabric runs, which may differ from the request (16-mixed on CPU runs bf16)
            "precision": str(getattr(fabric.strategy.precision, "precision",
                                     config.trainer.precision)),
            "finished": state.step >= self.total_steps,
            "stopped_by": self.stop_signals.received,
            "images_per_second": state.images_seen / max(state.train_seconds, 1e-9),
            "train_seconds": state.train_seconds,
            "skipped_steps": state.skipped_steps,
        }


def pretrain(config: Config, resume: str | None = None) -> dict:
    """Run pretraining (new or resumed) and, at the end, evaluation; returns ``metrics.json``.

    ``resume`` (a checkpoint or a run folder) continues that run, which must have been trained
    with ``config`` up to the settings a resume may change; without it, ``run.resume=auto``
    continues the run folder's newest checkpoint (:mod:`attnssl.runs.resume`)."""
    started = time.perf_counter()
    launched_here = RUN_DIR_ENV not in os.environ
    if resume is None:
        resume_from = auto_resume_checkpoint(config)
    else:
        resume_from = resolve_checkpoint(resume)
        check_same_run(config, resume_from,
                       load_training_checkpoint(resume_from, lazy=True)["config"])
    if not launched_here:  # a process Fabric launched: use rank 0's folder
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif resume_from is not None:
        run_dir = run_folder_of_checkpoint(resume_from)
        if run_dir is None:  # a checkpoint kept outside its run folder: continue in a new one
            run_dir = new_run_folder(config.run.out_dir,
                                     config.run.name or f"{config.method.name}-"
                                     f"{config.data.dataset}")
            print(f"{resume_from} is not inside a run folder's checkpoints/; the run continues "
                  f"in {run_dir}")
    else:
        run_dir = make_run_dir(config)
    lock = RunFolderLock(run_dir).acquire() if launched_here else None
    try:
        if launched_here and resume_from is None and latest_checkpoint(run_dir) is not None:
            raise FileExistsError(
                f"run folder {run_dir} already has checkpoints; resume it with --resume {run_dir} "
                f"or choose another run.name"
            )
        return _pretrain(config, run_dir, resume_from, started, launched_here)
    finally:
        if lock is not None:
            lock.release()


def _pretrain(config: Config, run_dir: Path, resume_from: Path | None, started: float,
              launched_here: bool) -> dict:
    trainer = Pretrainer(config, run_dir, resume_from)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes Fabric starts
    try:
        trainer.setup()
    finally:
        if launched_here:
            os.environ.pop(RUN_DIR_ENV, None)
    summary = trainer.fit()
    fabric = trainer.fabric
    metrics: dict = {"run_dir": str(run_dir), "rank": fabric.global_rank, **summary}
    fabric.barrier()  # training is over everywhere; only process 0 evaluates and writes
    if fabric.is_global_zero:
        backbone = evaluation_backbone(trainer.method.module)
        if summary["finished"] and config.eval.at_end:
            fabric.print("evaluating frozen features ...")
            summary["eval"] = evaluate_backbone(backbone, config, *trainer.eval_splits)
        metrics.update(write_run_outputs(run_dir, config, summary, started, backbone))
    return metrics
