"""``attnssl sweep``: train a preset at many settings and rank them by k-NN.

A sweep is a preset, fixed overrides (the budget: ``data.subset=12288 optim.epochs=5``, say)
and swept keys:

- ``key=a,b,c`` lists values (each read as YAML, so ``views.global_scale=[0.2,1],[0.4,1]`` is
  two values): without ``--trials`` every combination is trained (a grid);
- ``key=low..high`` (``:log`` for a log scale) is a range; with ``--trials N`` the space of
  ranges and lists is searched by Optuna's TPE sampler for N points in all.

Each point trains in its own run folder under ``OUT/points/``, named by a hash of its training
settings (a folder an older version named otherwise is found by its saved settings), and is
scored by the weighted k-NN on a fixed evaluation subset (``--eval-train`` bank images,
``--eval-test`` scored images, the first of each split). Points that differ only
in ``eval.*`` keys share one training run. The random-init floor on the same read-out is
computed once per distinct model and read-out (once in each worker process, with ``--workers``)
and shown beside the scores.

Why Optuna: its study storage (a journal file here, safe against a kill at any moment) records
which points are done, and its samplers search a space without a scheduler of our own. The
journal plus the run folders make a sweep resumable: rerunning the same command skips finished
points and continues a half-trained point from its newest checkpoint, exactly. Optuna's
pruning is not used: it needs a score during training, and a k-NN costs as much as many steps
at these budgets.

One sweep runs in a folder at a time (``OUT/.lock``, the run-folder lock). Within it,
``--workers N`` trains a grid's points in N processes side by side: the sweep's own process
takes the queued trials from the study, hands out one training run's points at a time, and
alone writes the study and the outputs; :func:`run_sweeps` gives several sweeps (each in its
own folder: the arms of a comparison) one pool of workers. Outputs in ``OUT``:
``study.journal`` (Optuna), ``results.json`` (every point: settings, scores, floor, images/s,
minutes, run folder), ``results.md`` (a table, best first) and ``sweep.png`` (k-NN against each
swept key's values).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from attnssl.config import (
    Config,
    ConfigError,
    OptimSection,
    config_to_dict,
    flatten_config,
    load_config,
    parse_override,
    with_defaults,
)

STUDY_NAME = "attnssl-sweep"


# ---------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Choice:
    """A swept key's listed values, kept as their YAML text (Optuna stores strings)."""

    key: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """A swept key's numeric range ``low..high`` (integers when both ends are)."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False


Dimension = Choice | Range


def split_values(raw: str) -> list[str]:
    """``a,b,[c,d]`` -> ``['a', 'b', '[c,d]']``: commas split values except inside brackets,
    braces and quotes."""
    values, depth, quote, current = [], 0, None, []
    for char in raw:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    if any(not v for v in values):
        raise ConfigError(f"sweep value list {raw!r} has an empty value")
    return values


def _number(text: str, key: str) -> float | int:
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    raise ConfigError(f"sweep range of {key}: {text!r} is not a number")


def parse_dimension(text: str) -> Dimension:
    """``key=a,b`` -> :class:`Choice`; ``key=low..high[:log]`` -> :class:`Range`."""
    if "=" not in text:
        raise ConfigError(f"sweep setting {text!r} must look like key=a,b (values), "
                          f"key=low..high[:log] (a range) or key=value (fixed)")
    key_text, _, raw = text.partition("=")
    key, raw = ".".join(parse_override(f"{key_text}=")[0]), raw.strip()
    if ".." in raw and not raw.startswith(("[", "{", "'", '"')):
        bounds, _, scale = raw.partition(":")
        if scale not in ("", "log"):
            raise ConfigError(f"sweep range {text!r}: the scale after ':' must be 'log'")
        low_text, _, high_text = bounds.partition("..")
        low, high = _number(low_text, key), _number(high_text, key)
        if not low < high:
            raise ConfigError(f"sweep range {text!r} needs low < high")
        if scale == "log" and low <= 0:
            raise ConfigError(f"sweep range {text!r}: a log scale needs low > 0")
        integer = isinstance(low, int) and isinstance(high, int)
        return Range(key, low, high, scale == "log", integer)
    return Choice(key, tuple(split_values(raw)))


@dataclass
class SweepSpec:
    """What to train: preset, fixed overrides and the space of swept ones."""

    preset: str
    fixed: list[str]
    dimensions: list[Dimension]
    trials: int | None = None  # None: the full grid
    eval_train: int = 10_000
    eval_test: int = 2_000
    linear: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_arguments(cls, preset: str, settings: list[str], **kwargs) -> SweepSpec:
        """Split ``key=value`` arguments into fixed ones (one value) and swept ones."""
        fixed, dimensions, seen = [], [], set()
        for text in settings:
            dimension = parse_dimension(text)
            if dimension.key in seen:
                raise ConfigError(f"sweep key {dimension.key} is given twice")
            seen.add(dimension.key)
            if isinstance(dimension, Choice) and len(dimension.texts) == 1:
                fixed.append(f"{dimension.key}={dimension.texts[0]}")
            else:
                dimensions.append(dimension)
        spec = cls(preset, fixed, dimensions, **kwargs)
        spec.validate()
        return spec

    def grid(self) -> list[dict[str, str]]:
        """Every combination of the listed values (ranges need ``--trials``)."""
        ranges = [d.key for d in self.dimensions if isinstance(d, Range)]
        if ranges:
            raise ConfigError(f"ranges ({', '.join(ranges)}) are sampled, not gridded: give "
                              f"--trials N, or list values as key=a,b,c")
        keys = [d.key for d in self.dimensions]
        return [dict(zip(keys, combo, strict=True))
                for combo in itertools.product(*(d.texts for d in self.dimensions))]

    def overrides(self, point: dict[str, str]) -> list[str]:
        return [*self.fixed, *(f"{k}={v}" for k, v in point.items()), *self._eval_budget()]

    def _eval_budget(self) -> list[str]:
        return [f"eval.max_train={self.eval_train}", f"eval.max_test={self.eval_test}",
                "eval.at_end=false"]

    def config(self, point: dict[str, str]) -> Config:
        return load_config(self.preset, self.overrides(point))

    def checked_points(self) -> list[dict[str, str]]:
        """The points :meth:`validate` resolves: each grid point, or (sampled) each listed value
        and each range's two ends, one key at a time."""
        if self.trials is None:
            return self.grid()
        points = []
        for dimension in self.dimensions:
            if isinstance(dimension, Choice):
                points += [{dimension.key: t} for t in dimension.texts]
            else:
                points += [{dimension.key: str(end)} for end in (dimension.low, dimension.high)]
        return points or [{}]

    def validate(self) -> None:
        """Every key and value is checked before any training: each of :meth:`checked_points`."""
        for point in self.checked_points():
            try:
                self.config(point)
            except ConfigError as err:
                where = ", ".join(f"{k}={v}" for k, v in point.items()) or "the fixed settings"
                raise ConfigError(f"sweep point {where}: {err}") from None

    def reference_config(self) -> Config:
        """The settings that identify the sweep's folder: its first checked point resolved (a
        point's own swept values aside, every point shares them)."""
        return self.config(self.checked_points()[0])


# ---------------------------------------------------------------- one point


def _short_hash(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def result_settings(tree: dict, with_eval: bool = False) -> dict:
    """A config (as a dict) without the settings that cannot change a training result
    (``BOOKKEEPING``, run names and folders, ``trainer.max_steps``), and without ``eval`` unless
    ``with_eval``. The learning rate is written as the peak the schedule reaches, ``lr *
    batch_size / lr_scaling_batch`` (or ``lr`` without the scaling rule): the trainer reads only
    that, so ``optim.lr_scaling_batch=256`` at batch 256 trains as the rule left unset does."""
    tree = dict(tree)
    if not with_eval:
        tree.pop("eval")
    optim = dict(tree["optim"])
    if optim.get("lr_scaling_batch") is not None:
        optim["lr"] = OptimSection.model_validate(optim).peak_lr
        optim["lr_scaling_batch"] = None
    tree["optim"] = optim
    tree["run"] = {"seed": tree["run"]["seed"]}
    tree["trainer"] = {k: v for k, v in tree["trainer"].items()
                       if f"trainer.{k}" not in BOOKKEEPING and k != "max_steps"}
    tree["data"] = {k: v for k, v in tree["data"].items() if f"data.{k}" not in BOOKKEEPING}
    return tree


def training_key(config: Config) -> str:
    """A short hash of everything but ``eval.*`` (and run bookkeeping): points with equal keys
    share one training run."""
    return _short_hash(result_settings(config_to_dict(config)))


def floor_key(config: Config) -> str:
    tree = config_to_dict(config)
    wanted = {"model": tree["model"], "seed": tree["run"]["seed"], "data": tree["data"],
              "views_global_size": tree["views"]["global_size"], "method": tree["method"]["name"],
              "eval": {k: tree["eval"][k] for k in ("features", "blocks", "knn_k",
                                                   "knn_temperature", "max_train", "max_test")}}
    return _short_hash(wanted)


TRAINED = "sweep-trained.json"


class SweepStopped(Exception):
    """A stop signal (Ctrl-C, SIGTERM) ended a point's training: the whole sweep stops, the
    point's checkpoint is kept, and rerunning the command continues it."""

    def __init__(self, signal_name: str, run_dir: Path):
        super().__init__(f"stopped by {signal_name} while training {run_dir}")
        self.signal_name = signal_name
        self.exit_code = 130 if signal_name == "SIGINT" else 143  # the shell's 128 + signal


def train_point(config: Config, run_dir: Path) -> dict:
    """Pretrain one point in ``run_dir`` to the end of its schedule, continuing from its newest
    checkpoint if it has one; returns the run summary (``metrics.json``). A finished point
    leaves ``sweep-trained.json`` and is not trained again."""
    from attnssl.runs.checkpoint import atomic_write, newest_readable_checkpoint
    from attnssl.train.environment import process_count
    from attnssl.train.trainer import pretrain

    marker = run_dir / TRAINED
    if marker.is_file():
        return json.loads(marker.read_text())
    config = config.model_copy(deep=True)
    config.run.out_dir, config.run.name = str(run_dir.parent), run_dir.name
    config.trainer.max_steps = None
    resume = newest_readable_checkpoint(run_dir)
    if process_count(config.trainer) > 1:
        metrics = pretrain_in_child(config, run_dir, resume)
    else:
        metrics = pretrain(config, resume=str(resume) if resume else None)
    if metrics.get("stopped_by"):
        raise SweepStopped(metrics["stopped_by"], run_dir)
    if not metrics["finished"]:
        raise RuntimeError(f"{run_dir} stopped before the end of its schedule")
    atomic_write(marker, lambda p: p.write_text(json.dumps(metrics, indent=2)))
    return metrics


@contextlib.contextmanager
def stop_signals_to(handler):
    """While inside, SIGINT and SIGTERM go to ``handler`` (in the main thread only: elsewhere
    Python cannot set one), then to what they went to before."""
    import signal
    import threading

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {name: signal.signal(name, handler)
                    for name in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for name, before in previous.items():
            signal.signal(name, before)


def pretrain_in_child(config: Config, run_dir: Path, resume: Path | None) -> dict:
    """Train a point of several processes with ``attnssl pretrain`` in a child process.

    Fabric starts the other processes of a run by running the command that started it again;
    in the sweep's own process that command would be the sweep. The child runs in a session of
    its own, and a SIGINT or SIGTERM the sweep receives goes once to the child and the
    processes Fabric started, which stop after their step with a checkpoint."""
    import subprocess

    import yaml

    from attnssl.runs.checkpoint import atomic_write

    if resume is None:
        config_file = run_dir.parent / f"{run_dir.name}.yaml"
        atomic_write(config_file, lambda p: p.write_text(
            yaml.safe_dump(config_to_dict(config), sort_keys=False)))
        command = ["-c", str(config_file)]
    else:
        command = ["--resume", str(resume), "trainer.max_steps=null"]
    child = subprocess.Popen([sys.executable, "-m", "attnssl", "pretrain", *command],
                             start_new_session=True)

    def forward(signum, _frame):
        os.killpg(child.pid, signum)

    with stop_signals_to(forward):
        code = child.wait()
    if code in (130, 143):
        raise SweepStopped("SIGINT" if code == 130 else "SIGTERM", run_dir)
    if code != 0:
        raise RuntimeError(f"{run_dir}: its training process (attnssl pretrain) exited with "
                           f"code {code}; its output is above")
    # exit code 0 without max_steps: trained to the end of the schedule
    return {**json.loads((run_dir / "metrics.json").read_text()), "finished": True}


def score_point(config: Config, run_dir: Path, linear: bool) -> dict:
    """k-NN (and the linear probe with ``linear``) of a trained point's evaluated backbone on
    the sweep's evaluation subset (``config.eval``)."""
    from attnssl.eval.evaluate import evaluate_features, load_trained_backbone
    from attnssl.nn.vit import run_eagerly

    loaded = load_trained_backbone(run_dir)
    with run_eagerly():
        return evaluate_features(loaded.backbone, config, loaded.train, loaded.test,
                                 linear=linear)


def random_init_score(config: Config) -> float:
    from attnssl.eval.evaluate import (
        backbone_image_size,
        evaluate_features,
        load_eval_splits,
        random_init_backbone,
    )

    train, test = load_eval_splits(config)
    untrained = random_init_backbone(config, backbone_image_size(config, train), train.channels)
    return evaluate_features(untrained, config, train, test, linear=False)["knn_top1"]


# ---------------------------------------------------------------- the study


def _optuna():
    try:
        import optuna
    except ImportError as err:
        raise ConfigError("attnssl sweep needs Optuna: pip install -e '.[sweep]' "
                          "(or pip install optuna)") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(out: Path, spec: SweepSpec):
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    sampler = optuna.samplers.TPESampler(seed=spec.seed) if spec.trials else None
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                sampler=sampler, load_if_exists=True)
    differences = sweep_differences(study.user_attrs.get("spec"),
                                    study.user_attrs.get("config"), spec)
    if differences:
        recorded = study.user_attrs["spec"]
        written = f"{recorded['preset']} {' '.join(recorded['settings'])}".strip()
        if (recorded["preset"], recorded["settings"]) == (spec.preset, describe(spec)["settings"]):
            what = f"its preset or the settings' defaults changed since it ran ({written})"
            advice = "choose another --out"
        else:
            what = written
            advice = "rerun that command to continue it, or choose another --out"
        raise ConfigError(
            f"{out} holds a sweep of other settings: {what}; it differs in "
            f"{'; '.join(differences)}. To go on, {advice} (moving {out / 'points'} into it "
            f"reuses each point trained with the same settings instead of training it again)")
    for name, value in (("spec", describe(spec)), ("config", config_to_dict(spec.reference_config()))):
        if study.user_attrs.get(name) != value:
            study.set_user_attr(name, value)
    return study


def sweep_differences(recorded: dict | None, recorded_config: dict | None,
                      spec: SweepSpec) -> list[str]:
    """What keeps ``spec`` from continuing the sweep recorded in a folder, one entry per
    difference (empty: the same sweep, or none recorded). Settings are compared as they
    resolve, so one sweep may be continued with overrides that only restate the preset's
    values, and is refused after a change to the preset itself (the swept keys excepted: the
    points set them; their values are compared as written); a setting added to the schema since
    the record counts at its default, as long as the record still validates (after a setting
    was removed or renamed, the record is refused)."""
    if recorded is None:
        return []
    described = describe(spec)
    if recorded_config is None:  # recorded before sweeps kept their resolved settings
        recorded = {**recorded, "swept": described["swept"]}
        return [] if recorded == described else ["its settings as written"]
    differences = [f"{key} (recorded {recorded.get(key)!r}, asked {described[key]!r})"
                   for key in IDENTITY if recorded.get(key) != described[key]]
    was = flatten_config(result_settings(with_defaults(recorded_config), with_eval=True))
    now = flatten_config(result_settings(config_to_dict(spec.reference_config()), with_eval=True))
    swept = {d.key for d in spec.dimensions}
    differences += [f"{key} (recorded {was.get(key)!r}, asked {now.get(key)!r})"
                    for key in sorted((was.keys() | now.keys()) - swept)
                    if was.get(key) != now.get(key)]
    return differences


# settings that cannot change a point's result: a sweep may be continued with others
BOOKKEEPING = ("trainer.progress_bar", "trainer.num_threads", "trainer.log_every_steps",
               "trainer.checkpoint_every_steps", "trainer.keep_checkpoints", "data.root",
               "data.num_workers")


def describe(spec: SweepSpec) -> dict:
    """What identifies a sweep: its preset, settings that change results (``settings``, as
    written; ``swept``, the swept ones), and its scoring."""
    settings = [s for s in spec.fixed if s.partition("=")[0] not in BOOKKEEPING]
    swept = []
    for d in spec.dimensions:
        if isinstance(d, Choice):
            swept.append(f"{d.key}={','.join(d.texts)}")
        else:
            swept.append(f"{d.key}={d.low}..{d.high}{':log' if d.log else ''}")
    return {"preset": spec.preset, "settings": settings + swept, "swept": swept,
            "trials": spec.trials, "eval_train": spec.eval_train, "eval_test": spec.eval_test,
            "linear": spec.linear}


# what identifies a sweep beside its resolved settings
IDENTITY = ("preset", "swept", "trials", "eval_train", "eval_test", "linear")


def _suggest(trial, dimension: Dimension) -> str:
    if isinstance(dimension, Choice):
        return trial.suggest_categorical(dimension.key, list(dimension.texts))
    if dimension.integer:
        return str(trial.suggest_int(dimension.key, int(dimension.low), int(dimension.high),
                                     log=dimension.log))
    value = trial.suggest_float(dimension.key, dimension.low, dimension.high, log=dimension.log)
    return f"{value:.4g}"


def _ask(study, spec: SweepSpec) -> tuple:
    """The study's next trial (a queued one first) and the point it stands for."""
    trial = study.ask()
    return trial, {d.key: _suggest(trial, d) for d in spec.dimensions}


def _requeue_interrupted(study) -> None:
    """Trials left running by a sweep that was stopped are failed and queued again with the
    same settings, so their run folders continue from their checkpoints."""
    optuna = _optuna()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(_params(trial), user_attrs={"requeued": True})


def _params(trial) -> dict:
    """A trial's settings, also before it ran (a queued trial holds them as fixed params)."""
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


def _is_done(trial) -> bool:
    """Trained and scored, or failed for a reason of its own (recorded as ``error``); a trial
    failed only because its sweep was stopped is queued again instead."""
    state = _optuna().trial.TrialState
    return trial.state == state.COMPLETE or (trial.state == state.FAIL
                                             and "error" in trial.user_attrs)


def _done_points(study) -> list[dict]:
    waiting = _optuna().trial.TrialState.WAITING
    return [_params(t) for t in study.get_trials(deepcopy=False)
            if _is_done(t) or t.state == waiting]


def run_sweep(spec: SweepSpec, out: Path, log=print, workers: int = 1) -> list[dict]:
    """Train and score every point not yet done; returns all results (also written to
    ``out``). With ``workers`` above 1 a grid's points train in that many processes side by
    side (:func:`_run_in_workers`)."""
    return run_sweeps([(spec, out)], log, workers)[0]


@dataclass
class _Sweep:
    """One sweep of :func:`run_sweeps`: its spec, folder, study, floors and point count."""

    spec: SweepSpec
    out: Path
    study: object
    floors: dict
    total: int


def run_sweeps(jobs: list[tuple[SweepSpec, Path]], log=print,
               workers: int = 1) -> list[list[dict]]:
    """:func:`run_sweep` for several sweeps at once, each a spec and its own folder (the arms
    of a comparison, say: another preset each). In turn, they run one after another; with
    ``workers`` above 1 the points of all of them share one pool of processes, so two sweeps
    of one point each train side by side. Returns each sweep's results, in order."""
    _optuna()
    from attnssl.runs.folder import RunFolderLock

    folders = [Path(out).resolve() for _, out in jobs]
    if len(set(folders)) < len(folders):
        raise ConfigError(f"run_sweeps: two sweeps share one folder ({', '.join(map(str, folders))}"
                          f"); give each sweep a folder of its own")
    for spec, _ in jobs:
        check_workers(spec, workers)
    with contextlib.ExitStack() as locks:
        sweeps = []
        for spec, out in jobs:  # one sweep at a time in a folder; a second names the holder
            locks.enter_context(RunFolderLock(out))
            sweeps.append(_open_sweep(spec, out))
        if workers > 1:
            _run_in_workers(sweeps, workers, log)
        else:
            for sweep in sweeps:
                _run_in_turn(sweep, log)
        results = []
        for sweep in sweeps:
            results.append(collect_results(sweep.study, sweep.spec))
            write_outputs(sweep.out, sweep.spec, results[-1])
        return results


def _open_sweep(spec: SweepSpec, out: Path) -> _Sweep:
    """Open a sweep's study, queue a grid's points not yet done, and read its floors."""
    study = open_study(out, spec)
    _requeue_interrupted(study)
    if spec.trials is None:
        done = _done_points(study)
        for point in spec.grid():
            if point not in done:
                study.enqueue_trial(point)
        total = len(spec.grid())
    else:
        total = spec.trials
    return _Sweep(spec, out, study, _load_floors(out), total)


def _run_in_turn(sweep: _Sweep, log) -> None:
    """Train and score a sweep's points in this process, one after another: a grid's waiting
    points in the order of :func:`_take_waiting`, or the sampler's choice, one trial at a time."""
    study, spec, out, floors, total = sweep.study, sweep.spec, sweep.out, sweep.floors, sweep.total
    if spec.trials is None:
        trials, groups = _take_waiting(study, spec, out)
        done = total - len(trials)
        for number, point in itertools.chain.from_iterable(groups):
            done += 1
            log(f"sweep: point {done}/{total}: {_label(point)}")
            _record(study, trials[number][0], point, _point_row(spec, out, point, floors),
                    spec, out, floors, log)
        return
    waiting = _optuna().trial.TrialState.WAITING
    while True:
        finished = [t for t in study.get_trials(deepcopy=False) if _is_done(t)]
        if len(finished) >= total and not study.get_trials(deepcopy=False, states=(waiting,)):
            break
        trial, point = _ask(study, spec)
        log(f"sweep: point {len(finished) + 1}/{total}: {_label(point)}")
        _record(study, trial, point, _point_row(spec, out, point, floors), spec, out, floors,
                log)


def _take_waiting(study, spec: SweepSpec, out: Path) -> tuple[dict, list[list]]:
    """Take every waiting trial of a grid from the study (each is then running, so a stop
    leaves it to be queued again); returns the trials by number, and their points grouped by
    training run (points that differ only in ``eval.*`` share one). Runs a stopped sweep
    started, trained or half trained, come first: the rerun finishes them before it starts
    new ones."""
    waiting = _optuna().trial.TrialState.WAITING
    trials, groups = {}, {}
    for _ in study.get_trials(deepcopy=False, states=(waiting,)):
        trial, point = _ask(study, spec)  # the next waiting trial, now running
        trials[trial.number] = trial, point
        groups.setdefault(training_key(spec.config(point)), []).append((trial.number, point))
    return trials, sorted(groups.values(), key=lambda group: not _started(out, spec, group))


def _started(out: Path, spec: SweepSpec, group: list) -> bool:
    from attnssl.runs.checkpoint import latest_checkpoint

    folder = point_folder(out, spec.config(group[0][1]))
    return (folder / TRAINED).is_file() or latest_checkpoint(folder) is not None


def check_workers(spec: SweepSpec, workers: int) -> None:
    """Refuse a worker count under 1, and more than one worker for a sampled search."""
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers {workers!r}: give a whole number of processes, 1 or more")
    if workers > 1 and spec.trials is not None:
        raise ConfigError(f"--workers {workers} trains a grid's points side by side; a sampled "
                          f"search (--trials) chooses each point from the ones before it, so "
                          f"it runs one point at a time: leave out --workers or --trials")


def _label(point: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(fixed settings)"


def _point_row(spec: SweepSpec, out: Path, point: dict[str, str], floors: dict) -> dict:
    """A point's scores, or its ``error`` when it failed for a reason of its own (a bad
    setting, a diverged loss); a stop signal, or a point folder another process holds, passes
    through."""
    from attnssl.runs.folder import RunFolderBusy

    try:
        return _run_point(spec, out, point, floors)
    except RunFolderBusy:
        raise
    except (ConfigError, ValueError, RuntimeError) as err:
        return {"error": (str(err).splitlines() or [type(err).__name__])[0][:300]}


def _record(study, trial, point: dict[str, str], row: dict, spec: SweepSpec, out: Path,
            floors: dict, log) -> None:
    """Tell the study a point's row (its scores, or its ``error``), keep its floor, and
    rewrite the outputs, so a stop keeps the tables."""
    state = _optuna().trial.TrialState
    for key, value in row.items():
        trial.set_user_attr(key, value)
    if "error" in row:
        study.tell(trial, state=state.FAIL)
        log(f"sweep: point failed: {row['error']}")
        return
    study.tell(trial, row["knn_top1"])
    log(f"sweep: k-NN {row['knn_top1']:.2f} % (random init {row['knn_floor']:.2f} %)")
    _save_floor(out, floors, floor_key(spec.config(point)), row["knn_floor"])
    write_outputs(out, spec, collect_results(study, spec))


def _run_in_workers(sweeps: list[_Sweep], workers: int, log) -> None:
    """Train the waiting points of one or more grids in ``workers`` processes side by side.

    This process takes the waiting trials from each sweep's study, grouped by training run
    (:func:`_take_waiting`; one process trains each run), and hands the groups out through a
    queue, every sweep's in turn. Only this process writes the studies and the outputs; the
    workers train and score.

    Stopping: each worker runs in a session of its own, so a Ctrl-C reaches this process,
    which passes the first SIGINT or SIGTERM on to every worker; a worker stops its training
    after the step with a checkpoint (or after the scoring it is doing), however many copies
    of the signal reach it (a scheduler signals every process). A second signal to this
    process kills the workers. A worker whose sweep process dies is sent SIGTERM by the
    kernel (Linux), so none trains on unseen."""
    import multiprocessing
    import queue
    import signal

    taken = [_take_waiting(sweep.study, sweep.spec, sweep.out) for sweep in sweeps]
    tasks_of_all = [(index, group) for index, (_, groups) in enumerate(taken) for group in groups]
    if not tasks_of_all:
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch
    tasks, messages = context.Queue(), context.Queue()
    tasks.cancel_join_thread()  # groups never handed out are not waited for at exit
    count = min(workers, len(tasks_of_all))
    for task in [*tasks_of_all, *[None] * count]:  # then one end mark for each worker
        tasks.put(task)
    jobs = [(sweep.spec, sweep.out) for sweep in sweeps]
    processes = [context.Process(target=_sweep_worker, args=(jobs, tasks, messages))
                 for _ in range(count)]
    stopped, failed = [], []

    def forward(signum, _frame):
        stopped.append(signal.Signals(signum).name)
        for process in processes:
            if process.pid is None or not process.is_alive():
                continue
            if len(stopped) == 1:
                os.kill(process.pid, signum)
            else:  # asked again: stop now
                process.kill()

    done = [sweep.total - len(trials) for sweep, (trials, _) in zip(sweeps, taken, strict=True)]
    with stop_signals_to(forward):
        try:
            for process in processes:
                process.start()
            while True:
                try:
                    message = messages.get(timeout=0.5)
                except queue.Empty:
                    if any(process.is_alive() for process in processes):
                        continue
                    try:  # the workers have ended: what they sent before is in the pipe
                        message = messages.get_nowait()
                    except queue.Empty:
                        break
                kind, *body = message
                if kind == "stopped":
                    stopped.append(body[0])
                elif kind == "failed":
                    failed.append(body[0])
                else:
                    index, number, row = body
                    sweep, done[index] = sweeps[index], done[index] + 1
                    trial, point = taken[index][0][number]
                    where = f" of {sweep.out}" if len(sweeps) > 1 else ""
                    log(f"sweep: point {done[index]}/{sweep.total}{where}: {_label(point)}")
                    _record(sweep.study, trial, point, row, sweep.spec, sweep.out, sweep.floors,
                            log)
        except BaseException:  # this process failed: the workers stop with their checkpoints
            if not stopped:
                forward(signal.SIGTERM, None)
            raise
        finally:
            for process in processes:
                process.join()
    killed = [p.exitcode for p in processes if p.exitcode]
    if stopped:
        if killed:
            log(f"sweep: {len(killed)} worker(s) ended without stopping cleanly (exit code "
                f"{', '.join(map(str, killed))}): their points continue from their newest "
                f"periodic checkpoint")
        raise SweepStopped(stopped[0], Path(os.path.commonpath([s.out for s in sweeps])))
    failed += [f"exit code {code}" for code in killed]
    if failed:
        raise SweepWorkerDied(f"a sweep worker stopped on an error ({failed[0]}; its output "
                              f"is above); the points it held are queued again, and the same "
                              f"command continues them")


class SweepWorkerDied(Exception):
    """A worker of a side-by-side sweep ended without finishing its points (an error, a kill,
    out of memory); the study keeps them running, so a rerun queues them again."""


def _sweep_worker(jobs: list[tuple[SweepSpec, Path]], tasks, messages) -> None:
    """A process of :func:`_run_in_workers`: takes one training run's points at a time (with
    the index of its sweep among ``jobs``) from ``tasks`` until the end mark and sends
    ``("row", sweep index, trial number, row)`` for each; a stop sends ``("stopped", signal
    name)``, an unforeseen error ``("failed", text)``."""
    import multiprocessing
    import signal

    from attnssl.train.environment import StopSignals

    def ask_to_stop(signum, _frame):  # never kills: training or scoring ends first
        StopSignals.asked = StopSignals.asked or signal.Signals(signum).name

    os.setsid()
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, ask_to_stop)
    parent = multiprocessing.parent_process()
    _stop_when_parent_dies(parent.pid)
    floors = [_load_floors(out) for _, out in jobs]
    try:
        while StopSignals.asked is None and (task := tasks.get()) is not None:
            index, group = task
            spec, out = jobs[index]
            for number, point in group:
                if StopSignals.asked is not None or not parent.is_alive():
                    break
                print(f"sweep: worker {os.getpid()} trains {_label(point)}", flush=True)
                row = _point_row(spec, out, point, floors[index])
                if "error" not in row:
                    floors[index][floor_key(spec.config(point))] = row["knn_floor"]
                messages.put(("row", index, number, row))
    except SweepStopped as stop:
        messages.put(("stopped", stop.signal_name))
        return
    except Exception as err:
        messages.put(("failed", f"{type(err).__name__}: {str(err)[:300]}"))
        raise
    if StopSignals.asked is not None:
        messages.put(("stopped", StopSignals.asked))


def _stop_when_parent_dies(parent_pid: int) -> None:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux's
    ``PR_SET_PDEATHSIG``); elsewhere the worker checks its parent before each point."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def _load_floors(out: Path) -> dict[str, float]:
    path = out / "floors.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_floor(out: Path, floors: dict[str, float], key: str, value: float) -> None:
    """Keep a random-init floor in ``floors.json`` (written by the sweep's own process only)."""
    from attnssl.runs.checkpoint import atomic_write

    if floors.get(key) == value:
        return
    floors[key] = value
    atomic_write(out / "floors.json", lambda p: p.write_text(json.dumps(floors, indent=2)))


def point_folder(out: Path, config: Config) -> Path:
    """A point's run folder, ``points/<training key>``; or a folder of an earlier version whose
    saved config has the same training settings under today's settings schema (a setting added
    since, at its default, changes the key), so that an upgrade does not retrain a point."""
    key = training_key(config)
    folder = out / "points" / key
    if folder.exists():
        return folder
    for saved in sorted((out / "points").glob("*/config.yaml")):
        try:
            earlier = load_config(str(saved))
        except ConfigError:  # a setting since removed or renamed: not the same training
            continue
        if training_key(earlier) == key:
            return saved.parent
    return folder


def _run_point(spec: SweepSpec, out: Path, point: dict[str, str], floors: dict) -> dict:
    config = spec.config(point)
    run_dir = point_folder(out, config)
    started = time.perf_counter()
    metrics = train_point(config, run_dir)
    scores = score_point(config, run_dir, spec.linear)
    key = floor_key(config)
    if key not in floors:  # another worker's point may have scored this floor since
        floors.update(_load_floors(out))
    floor = floors[key] if key in floors else random_init_score(config)
    row = {"knn_top1": scores["knn_top1"], "knn_floor": floor,
           "images_per_second": metrics["images_per_second"],
           "train_minutes": metrics["train_seconds"] / 60, "steps": metrics["steps"],
           "precision": metrics["precision"], "run_dir": str(run_dir),
           "point_seconds": time.perf_counter() - started}
    if "linear_top1" in scores:
        row["linear_top1"] = scores["linear_top1"]
    return row


def collect_results(study, spec: SweepSpec) -> list[dict]:
    """Every done trial: its point and scores, or its point and error."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if _is_done(trial):
            attrs = trial.user_attrs if "error" not in trial.user_attrs else \
                {"error": trial.user_attrs["error"]}
            rows.append({"point": dict(trial.params), **attrs})
    return rows


# ---------------------------------------------------------------- outputs


def markdown_table(spec: SweepSpec, results: list[dict]) -> str:
    keys = [d.key for d in spec.dimensions]
    scored = sorted((r for r in results if "knn_top1" in r), key=lambda r: -r["knn_top1"])
    failed = [r for r in results if "error" in r]
    header = [*keys, "k-NN", *(["linear"] if spec.linear else []), "random init", "images/s",
              "min", "precision"]
    lines = ["| " + " | ".join(f"`{h}`" if h in keys else h for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    for r in scored:
        cells = [str(r["point"].get(k, "")) for k in keys]
        cells.append(f"{r['knn_top1']:.2f}")
        if spec.linear:
            cells.append(f"{r.get('linear_top1', float('nan')):.2f}")
        cells += [f"{r['knn_floor']:.2f}", f"{r['images_per_second']:.0f}",
                  f"{r['train_minutes']:.1f}", r["precision"]]
        lines.append("| " + " | ".join(cells) + " |")
    for r in failed:
        cells = [str(r["point"].get(k, "")) for k in keys] + [f"failed: {r['error']}"]
        cells += [""] * (len(header) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    budget = " ".join(spec.fixed) or "the preset's"
    readout = "the read-out in each row" if any(k.startswith("eval.") for k in keys) \
        else "the preset's read-out"
    return (f"Sweep of `{spec.preset}`; fixed: `{budget}`; weighted k-NN on {readout}, with "
            f"the first {spec.eval_train} training images as the bank and the first "
            f"{spec.eval_test} test images scored.\n\n" + "\n".join(lines) + "\n")


def written_files(spec: SweepSpec, results: list[dict]) -> list[str]:
    """The files a sweep writes: the plot only where a key is swept and a point was scored."""
    plotted = bool(spec.dimensions) and any("knn_top1" in r for r in results)
    return ["results.json", "results.md"] + ["sweep.png"] * plotted


def plot_sweep(spec: SweepSpec, results: list[dict], path: Path) -> Path | None:
    """k-NN against each swept key (one panel per key), the random-init floor dashed."""
    if "sweep.png" not in written_files(spec, results):
        return None
    scored = [r for r in results if "knn_top1" in r]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(spec.dimensions)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for axis, dimension in zip(axes[0], spec.dimensions, strict=True):
        if isinstance(dimension, Choice):
            order = list(dimension.texts)
            xs = [order.index(r["point"][dimension.key]) for r in scored]
            axis.set_xticks(range(len(order)), order, rotation=30, fontsize=8)
        else:
            xs = [float(r["point"][dimension.key]) for r in scored]
            if dimension.log:
                axis.set_xscale("log")
        axis.scatter(xs, [r["knn_top1"] for r in scored], label="trained")
        floors = sorted({r["knn_floor"] for r in scored})
        for i, floor in enumerate(floors):
            axis.axhline(floor, linestyle="--", color="gray",
                         label="random init" if i == 0 else None)
        axis.set_xlabel(dimension.key)
        axis.set_ylabel("k-NN top-1 (%)")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out: Path, spec: SweepSpec, results: list[dict]) -> None:
    from attnssl.runs.checkpoint import atomic_write

    payload = {"sweep": describe(spec), "results": results}
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(payload, indent=2)))
    table = markdown_table(spec, results)
    atomic_write(out / "results.md", lambda p: p.write_text(table))
    plot_sweep(spec, results, out / "sweep.png")


def unfinished_sweep_exit(ended: SweepStopped | SweepWorkerDied, what: str) -> int:
    """Say on stderr how a sweep (or a ``what`` made of sweeps) ended unfinished, and return
    its exit code: 130 / 143 for a stop signal, 1 for a worker that died. Its points stay
    running in the study, so the same command queues them again and continues them."""
    if isinstance(ended, SweepWorkerDied):
        print(f"sweep: {ended}", file=sys.stderr)
        return 1
    print(f"sweep {ended}; its checkpoints are kept, and the same command continues the {what} "
          f"from them", file=sys.stderr)
    return ended.exit_code


def main_sweep(preset: str, settings: list[str], out: str | None, trials: int | None,
               eval_train: int, eval_test: int, linear: bool, seed: int,
               workers: int = 1) -> int:
    spec = SweepSpec.from_arguments(preset, settings, trials=trials, eval_train=eval_train,
                                    eval_test=eval_test, linear=linear, seed=seed)
    folder = Path(out) if out else Path("runs") / f"sweep-{Path(preset).stem}"
    points = spec.trials or len(spec.grid())
    print(f"sweep: {points} point{'s' * (points != 1)} of {preset} into {folder}")
    try:
        results = run_sweep(spec, folder, workers=workers)
    except (SweepStopped, SweepWorkerDied) as ended:
        return unfinished_sweep_exit(ended, "sweep")
    print(markdown_table(spec, results), end="")
    print(f"wrote {', '.join(str(folder / name) for name in written_files(spec, results))}")
    if any("error" in r for r in results):
        print("some points failed; their errors are in the table", file=sys.stderr)
    return 0

