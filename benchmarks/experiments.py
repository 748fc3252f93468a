"""The papers' open questions at small scale (docs/experiments.md): one command per section.

Each section is one or more sweeps (:mod:`attnssl.sweep`) of a B1 v2 preset at the screening
budget (240 steps on 12,288 images: ``data.subset=12288 optim.epochs=5``) with two seeds, or
(the theory paper's synthetic model, which trains no preset) runs of :mod:`attnssl.theory`.
A sweep section's rows group the seeds of each setting: their mean, each seed's score, and the
section's spread (the largest seed-to-seed difference of any setting). A row's difference to
the preset's own setting is called noise when it is inside that spread.

    python -m benchmarks.experiments --list
    python -m benchmarks.experiments bam-positive-masking --docs   # train, score, write docs
    python -m benchmarks.experiments bam-sinkhorn-iters --dataset cifar10 --data-root DIR
    python -m benchmarks.experiments bam-positive-masking --full-budget --docs  # confirm, 1 seed

Every point trains in ``RUNS/SECTION/[ARM/]points/HASH`` and a rerun skips finished points
(the sweep's journal), so a section can be run in pieces (Ctrl-C, then the same command).
``--dataset`` (with ``--data-root``) reruns a section on another dataset: the preset's
``data.dataset`` is replaced, everything else is kept. Outputs: ``results/experiments/
SECTION.json`` (every point), ``SECTION.md`` (the table) and ``SECTION.png``; ``--docs`` puts
the table into its block of docs/experiments.md. ``--full-budget`` trains a section on the full
B1 v2 budget (the preset's 60,000 images, 5 epochs; seed 0 unless ``--seeds``) to confirm an
effect the screen found beyond the spread; it writes ``SECTION-full`` (folder, files and docs
block) beside the screen's. ``--only KEY=V1,V2`` (and ``--arms LABEL ...``) trains a subset of
a section's settings, to confirm one screened effect on the full budget without the rest of
its grid; it writes ``SECTION[-full]-only-...``, named by the subset.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.helpers import (
    BAM_OFFICIAL,
    ROOT,
    machine_line,
    machines_line,
    readme_block_holder,
    replace_readme_block,
)

SCREEN = ("data.subset=12288", "optim.epochs=5")
SEEDS = (0, 1)
FULL_SEEDS = (0,)  # a confirmation on the full budget
EVAL_TRAIN, EVAL_TEST = 20_000, 5_000
FULL_IMAGES = 60_000  # the full B1 v2 budget's training images (Fashion-MNIST's training set)
RESULTS = ROOT / "benchmarks" / "results" / "experiments"


@dataclass(frozen=True)
class Arm:
    """One sweep of a section: a label, a preset and settings on top of the screening budget
    (``key=a,b`` sweeps, ``key=a`` fixes)."""

    label: str
    preset: str
    settings: tuple[str, ...]


@dataclass(frozen=True)
class Experiment:
    name: str
    paper: str
    question: str
    arms: tuple[Arm, ...] = ()
    linear: bool = False
    measures: tuple[str, ...] = ()  # besides the k-NN: "bam_entropies", "attention", "dense"
    budget: tuple[str, ...] = SCREEN
    run: Callable | None = None  # sections that train no preset: run(args) -> markdown
    full: bool = False  # on the full B1 v2 budget (``on_full_budget``), not the screening one
    arm_header: str = "method"  # the table's column of arm labels, when there are several
    # the row each row is judged against: "preset" (its arm's preset setting) or "arms" (the
    # first arm's row at the same settings, where no setting is the preset's own)
    compare: str = "preset"
    # ``--only`` and ``--arms``: the subset trained, as ``key=a,b`` settings and arm labels
    # (empty: the whole section); see :func:`narrowed`
    only: tuple[str, ...] = ()
    chosen_arms: tuple[str, ...] = ()

    def __post_init__(self):
        if self.compare not in ("preset", "arms"):
            raise ValueError(f"{self.name}: compare={self.compare!r}; accepted: 'preset' (each "
                             f"row against its arm's preset setting) or 'arms' (against the "
                             f"first arm's row at the same settings)")

    @property
    def slug(self) -> str:
        """Its runs folder, results files and docs block: the name, with ``-full`` on the full
        budget and ``-only-...`` naming a subset (``--only``, ``--arms``)."""
        slug = f"{self.name}-full" if self.full else self.name
        subset = [*(f"{key.rsplit('.', 1)[-1]}-{raw}" for key, _, raw in
                    (s.partition("=") for s in self.only)), *self.chosen_arms]
        return slug + ("-only-" + re.sub(r"[^\w.]+", "-", "-".join(subset)).strip("-")
                       if subset else "")

    @property
    def several_arms(self) -> bool:
        """Whether its rows name their arm: a section of several arms, or some of them."""
        return len(self.arms) > 1 or bool(self.chosen_arms)

    def settings_of(self, arm: Arm) -> tuple[str, ...]:
        """The arm's settings with the values ``--only`` kept in place of the section's."""
        kept = dict(s.split("=", 1) for s in self.only)
        return tuple(f"{key}={kept.get(key, raw)}"
                     for key, _, raw in (s.partition("=") for s in arm.settings))

    def budget_text(self) -> str:
        if not self.budget:
            return "the full B1 v2 budget (the preset's own: 60,000 training images, 5 epochs)"
        return f"`{' '.join(self.budget)}`"

    def swept_keys(self) -> list[str]:
        """The keys the arms sweep (more than one value; a list such as ``[0.2,1.0]`` is one)."""
        return list(_swept_values(self.arms[0]))


def own_data(experiment: Experiment) -> str | None:
    """The data a section makes itself, or None for one that trains on the chosen dataset."""
    if experiment.run:
        return "the synthetic model of the theory paper"
    return next((s for arm in experiment.arms for s in arm.settings
                 if s.startswith("data.dataset=")), None)


def check_dataset_applies(experiment: Experiment) -> None:
    """``--dataset`` reruns a section on other images; a section that makes its own data (the
    theory paper's synthetic model, or an arm fixing ``data.dataset``) would ignore it, so it
    is refused by name instead of silently answering on the section's own data."""
    own = own_data(experiment)
    if own:
        others = ", ".join(e.name for e in EXPERIMENTS if not own_data(e))
        raise SystemExit(f"{experiment.name} trains on its own data ({own}), so --dataset and "
                         f"--data-root do not apply to it; they apply to: {others}")


def on_full_budget(experiment: Experiment) -> Experiment:
    """The section on the full B1 v2 budget, to confirm an effect the screen found beyond the
    seed spread (one seed unless told otherwise); it trains and writes apart from the screen."""
    if experiment.run:
        raise SystemExit(f"{experiment.name} trains no preset, so it has no full budget: "
                         f"--full-budget applies to the sections that sweep a preset")
    return dataclasses.replace(experiment, budget=(), full=True, arms=tuple(
        dataclasses.replace(arm, settings=tuple(
            f"data.synthetic_size={FULL_IMAGES}" if s.startswith("data.synthetic_size=") else s
            for s in arm.settings)) for arm in experiment.arms))


def narrowed(experiment: Experiment, only: list[str], arms: list[str]) -> Experiment:
    """The section trained on a subset of its grid: ``only`` keeps some of the values of a
    swept key (``key=a,b``), ``arms`` some of its arms (by label). A screened effect is
    confirmed on the full budget beside the row it is judged against, not with the whole grid;
    so the subset must come from the section's own values and keep that row (the preset's
    value, or the first arm of a section judged arm against arm). Its points have the same
    training settings as the whole section's (they are reused if moved into its folder).
    Filters that keep everything are dropped, so they do not rename the section."""
    from attnssl.config import ConfigError
    from attnssl.sweep import split_values

    if not only and not arms:
        return experiment
    if experiment.run:
        raise SystemExit(f"{experiment.name} trains no preset, so --only and --arms do not "
                         f"apply to it; they apply to the sections that sweep a preset")
    labels = [arm.label for arm in experiment.arms]
    unknown_arms = [label for label in arms if label not in labels]
    if unknown_arms:
        raise SystemExit(f"--arms {' '.join(unknown_arms)}: not an arm of {experiment.name}; "
                         f"its arms: {', '.join(labels)}")
    chosen = [arm for arm in experiment.arms if not arms or arm.label in arms]
    if experiment.compare == "arms" and chosen[0] is not experiment.arms[0]:
        raise SystemExit(f"--arms {' '.join(arms)}: keep {labels[0]}, the arm the other arms "
                         f"of {experiment.name} are judged against")
    swept = [_swept_values(arm) for arm in chosen]  # each chosen arm's swept key -> values
    keys = list(dict.fromkeys(key for values in swept for key in values))
    kept: dict[str, list[str]] = {}
    for setting in only:
        key, _, raw = setting.partition("=")
        if key not in keys or not raw:
            hint = f"; e.g. --only {keys[0]}={','.join(swept[0][keys[0]][:2])}" if keys else ""
            raise SystemExit(f"--only {setting!r}: write KEY=VALUE[,VALUE...] with a key "
                             f"{experiment.name} sweeps ({', '.join(keys) or 'none'}){hint}")
        if key in kept:
            raise SystemExit(f"--only names {key} twice: give its values once, comma-separated")
        try:
            values = split_values(raw)
        except ConfigError as err:
            raise SystemExit(f"--only {setting!r}: {err}") from None
        for listed in (arm_values[key] for arm_values in swept if key in arm_values):
            foreign = [v for v in values if not any(same_value(v, w) for w in listed)]
            if foreign:
                raise SystemExit(f"--only {setting!r}: {', '.join(foreign)} is not among the "
                                 f"values {experiment.name} sweeps for {key} "
                                 f"({', '.join(listed)})")
        listed = next(arm_values[key] for arm_values in swept if key in arm_values)
        kept[key] = [w for w in listed if any(same_value(v, w) for v in values)]
    if experiment.compare == "preset":
        _check_keeps_the_preset_row(experiment, chosen, swept, kept)
    return dataclasses.replace(
        experiment, arms=tuple(chosen),
        only=tuple(f"{key}={','.join(kept[key])}" for key in keys if key in kept and any(
            len(kept[key]) < len(arm_values.get(key, kept[key])) for arm_values in swept)),
        chosen_arms=tuple(arm.label for arm in chosen) if len(chosen) < len(labels) else ())


def _swept_values(arm: Arm) -> dict[str, list[str]]:
    """The keys an arm sweeps (more than one value) and their values, as written."""
    from attnssl.sweep import split_values

    values = {key: split_values(raw) for key, _, raw in (s.partition("=") for s in arm.settings)}
    return {key: listed for key, listed in values.items() if len(listed) > 1}


def _check_keeps_the_preset_row(experiment: Experiment, chosen: list[Arm],
                                swept: list[dict[str, list[str]]],
                                kept: dict[str, list[str]]) -> None:
    """Refuse a subset that leaves out the row its arm's rows are judged against: the preset's
    value of every swept key, where the section has such a row (section 4's grid has none)."""
    for arm, arm_values in zip(chosen, swept, strict=True):
        own = preset_point(arm, list(arm_values))
        if not all(any(same_value(own[key], w) for w in listed)
                   for key, listed in arm_values.items()):
            continue  # no row of this arm is the preset's own: nothing to keep
        for key, values in kept.items():
            if key in own and not any(same_value(own[key], v) for v in values):
                written = [w for w in arm_values[key] if same_value(own[key], w) or w in values]
                raise SystemExit(
                    f"--only {key}={','.join(values)} leaves out the preset's value "
                    f"({own[key]}), the row the others are judged against; keep it: --only "
                    f"{key}={','.join(written)}")


def _arm(preset: str, *settings: str, label: str | None = None) -> Arm:
    return Arm(label or preset.split("_")[0], preset, settings)


# ---------------------------------------------------------------- measures of a trained point


def training_log_means(run_dir: Path, columns: tuple[str, ...], last: int = 5) -> dict:
    """The mean of each column over the last ``last`` logged steps of ``metrics.csv``."""
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if all(r.get(c) not in (None, "") for c in columns)]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.csv logs none of {', '.join(columns)}")
    return {c: statistics.fmean(float(r[c]) for r in rows[-last:]) for c in columns}


def attention_measures(loaded, images: int = 256) -> dict:
    """Per layer (first to last) of the trained backbone on the first test images: the
    patch-to-patch attention entropy (nats), mean attention distance (px), diversity across
    queries, effective rank, and the class token's attention entropy
    (:func:`attnssl.analysis.analyze_backbone`)."""
    from attnssl.analysis import analyze_backbone

    result, _ = analyze_backbone(loaded.backbone, loaded.test, loaded.config.eval.features, images)
    layers = result["per_layer"]
    return {"attention_entropy": layers["entropy"], "attention_distance": layers["distance"],
            "attention_diversity": layers["diversity"], "cls_entropy": layers["cls_entropy"],
            "attention_rank": layers["rank"], "uniform_entropy": result["uniform_entropy"]}


def dense_measures(loaded, images: int = 4000, test_images: int = 2000,
                   epochs: int = 10) -> dict:
    """The dense patch probe (:mod:`benchmarks.dense_patch_probe`): a linear probe on the
    frozen patch tokens of the first training images, scored on the first test images' patches,
    all of them and the foreground ones (the dataset's masks, or Fashion-MNIST's silhouettes)."""
    from benchmarks.dense_patch_probe import dense_scores, silhouette_labels

    patch = loaded.backbone.patch_embed.patch_size[0]
    train, test = loaded.train.subset(images), loaded.test.subset(test_images)
    labels = (None, None) if train.masks is not None else \
        (silhouette_labels(train, patch), silhouette_labels(test, patch))
    return dense_scores(loaded.backbone, train, test, patch, epochs, *labels)


def point_measures(run_dir: Path, measures: tuple[str, ...]) -> dict:
    """The section's extra measures of one trained point, kept in its folder once computed;
    only the section's own are returned (a point moved in from another section may carry
    others in its cache)."""
    from attnssl.eval.evaluate import load_trained_backbone

    cache = run_dir / "experiment-measures.json"
    found = json.loads(cache.read_text()) if cache.is_file() else {}
    loaded = None  # the trained backbone, loaded once for the measures that need it
    for measure in measures:
        if measure in found:
            continue
        if measure in ("attention", "dense") and loaded is None:
            loaded = load_trained_backbone(run_dir)
        if measure == "bam_entropies":
            found[measure] = training_log_means(run_dir, ("source_entropy", "target_entropy"))
        elif measure == "attention":
            found[measure] = attention_measures(loaded)
        elif measure == "dense":
            found[measure] = dense_measures(loaded)
        else:
            raise ValueError(f"unknown measure {measure!r}; accepted: bam_entropies, attention, "
                             f"dense")
    cache.write_text(json.dumps(found, indent=2))
    return {measure: found[measure] for measure in measures}


# ---------------------------------------------------------------- running a section


def arm_settings(experiment: Experiment, arm: Arm, args) -> list[str]:
    settings = [*experiment.budget]
    if args.dataset:
        settings.append(f"data.dataset={args.dataset}")
    settings += [f"run.seed={','.join(map(str, args.seeds))}", *experiment.settings_of(arm)]
    settings += [f"trainer.num_threads={args.threads}", "trainer.progress_bar=false"]
    if args.data_root:
        settings.append(f"data.root={args.data_root}")
    return settings


def arm_folder(experiment: Experiment, arm: Arm, runs_dir: Path) -> Path:
    base = runs_dir / experiment.slug
    return base if len(experiment.arms) == 1 else base / arm.label


def arm_sweep(experiment: Experiment, arm: Arm, args):
    """The arm's sweep: its spec and its folder."""
    from attnssl.sweep import SweepSpec

    spec = SweepSpec.from_arguments(arm.preset, arm_settings(experiment, arm, args),
                                    eval_train=EVAL_TRAIN, eval_test=EVAL_TEST,
                                    linear=experiment.linear)
    return spec, arm_folder(experiment, arm, Path(args.runs_dir))


def arm_rows(experiment: Experiment, arm: Arm, args, results: list[dict]) -> list[dict]:
    """The arm's sweep results as table rows: each point's measures, and its full settings."""
    from attnssl.sweep import split_values

    # a key ``--only`` kept at one value is fixed for the sweep, not part of its points: put
    # it back, in the order the settings list the keys
    fixed = {key: raw for key, _, raw in (s.partition("=") for s in experiment.only)
             if len(split_values(raw)) == 1}
    order = [s.partition("=")[0] for s in arm_settings(experiment, arm, args)]
    rows = []
    for result in results:
        if "error" in result:
            raise SystemExit(f"{experiment.name}: point {result['point']} failed: "
                             f"{result['error']}")
        measured = point_measures(Path(result["run_dir"]), experiment.measures)
        point = sorted({**fixed, **result["point"]}.items(), key=lambda item: order.index(
            item[0]) if item[0] in order else len(order))
        rows.append({"arm": arm.label, **result, **measured, "point": dict(point)})
    return rows


def run_arms(experiment: Experiment, args) -> list[dict]:
    """Train every arm's points (``--workers`` processes side by side, across the arms, so a
    confirmation of one point per arm trains its arms at once) and return their rows."""
    from attnssl.sweep import run_sweeps

    results = run_sweeps([arm_sweep(experiment, arm, args) for arm in experiment.arms],
                         workers=args.workers)
    return [row for arm, arm_results in zip(experiment.arms, results, strict=True)
            for row in arm_rows(experiment, arm, args, arm_results)]


def preset_point(arm: Arm, keys: list[str]) -> dict[str, str]:
    """The preset's own value of each swept key, as the sweep writes it (YAML text)."""
    from attnssl.config import config_to_dict, load_config

    tree = config_to_dict(load_config(arm.preset))
    values = {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node[part]
        values[key] = json.dumps(node) if isinstance(node, (list, bool)) or node is None \
            else str(node)
    return values


def same_value(a: str, b: str) -> bool:
    import yaml

    return yaml.safe_load(a) == yaml.safe_load(b)


def in_grid_order(grouped: list[dict], experiment: Experiment) -> list[dict]:
    """The grouped rows in the order the section writes its settings (arm by arm, then each
    swept key's values as listed), not the order the points happened to finish in."""
    from attnssl.sweep import split_values

    listed = {arm.label: (index, [(key, split_values(raw)) for key, _, raw in
                                  (s.partition("=") for s in arm.settings)])
              for index, arm in enumerate(experiment.arms)}

    def position(row: dict) -> tuple:
        index, values = listed[row["arm"]]
        return (index, *(next((i for i, v in enumerate(written)
                               if same_value(v, row["point"][key])), len(written))
                         for key, written in values if key in row["point"]))

    return sorted(grouped, key=position)


def group_seeds(rows: list[dict]) -> list[dict]:
    """One row per arm and setting: each seed's scores and their mean."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        point = {k: v for k, v in row["point"].items() if k != "run.seed"}
        groups.setdefault((row["arm"], tuple(point.items())), []).append(row)
    grouped = []
    for (arm, point), members in groups.items():
        members.sort(key=lambda r: int(r["point"].get("run.seed", 0)))
        entry = {"arm": arm, "point": dict(point), "seeds": [int(m["point"].get("run.seed", 0))
                                                             for m in members]}
        for score in ("knn_top1", "linear_top1", "knn_floor", "images_per_second"):
            values = [m[score] for m in members if m.get(score) is not None]
            if values:
                entry[score] = statistics.fmean(values)
                entry[f"{score}_each"] = values
        for measure in ("bam_entropies", "attention", "dense"):
            if measure in members[0]:
                entry[measure] = _mean_tree([m[measure] for m in members])
        grouped.append(entry)
    return grouped


def _mean_tree(trees: list):
    first = trees[0]
    if isinstance(first, dict):
        return {k: _mean_tree([t[k] for t in trees]) for k in first}
    if isinstance(first, list):
        return [_mean_tree([t[i] for t in trees]) for i in range(len(first))]
    return statistics.fmean(trees)


def spread(grouped: list[dict], score: str = "knn_top1") -> float:
    """The largest seed-to-seed difference of any setting (0 with one seed)."""
    gaps = [max(g[f"{score}_each"]) - min(g[f"{score}_each"]) for g in grouped
            if len(g.get(f"{score}_each", [])) > 1]
    return max(gaps, default=0.0)


def has_seed_spread(grouped: list[dict]) -> bool:
    """Whether some setting ran on more than one seed, so that the spread is the noise
    yardstick (else :func:`two_standard_errors` is)."""
    return any(len(g.get("knn_top1_each", [])) > 1 for g in grouped)


def two_standard_errors(knn_top1: float, images: int = EVAL_TEST) -> float:
    """Two standard errors (points) of the difference of two k-NN accuracies near ``knn_top1``
    % on ``images`` test images: 2 * 100 * sqrt(2 p (1 - p) / images). The noise yardstick of a
    section with one seed, which has no seed spread."""
    p = knn_top1 / 100
    return 200 * math.sqrt(2 * p * (1 - p) / images)


def compare_rows(grouped: list[dict], experiment: Experiment) -> None:
    """Each row's k-NN difference to its reference row (``knn_difference``), and whether it is
    noise: inside the seed spread, or with one seed inside two standard errors of the test set.
    The reference is the arm's preset setting, or with ``compare="arms"`` the first arm's row
    at the same settings."""
    if experiment.compare == "arms":
        compare_arms(grouped, experiment)
    else:
        compare_to_preset(grouped, experiment)


def compare_to_preset(grouped: list[dict], experiment: Experiment) -> None:
    """Each arm's rows against the row at the preset's own value of every swept key (marked
    ``is_preset``); an arm with no such row is not judged."""
    keys = [k for k in experiment.swept_keys() if k != "run.seed"]
    seed_spread = section_spread(grouped)
    for arm in experiment.arms:
        own = preset_point(arm, keys)
        members = [g for g in grouped if g["arm"] == arm.label]
        reference = next((g for g in members if all(same_value(g["point"][k], own[k])
                                                    for k in keys)), None)
        for g in members:
            g["is_preset"] = g is reference
        if reference is not None:
            judge(reference, [g for g in members if g is not reference], seed_spread)


def compare_arms(grouped: list[dict], experiment: Experiment) -> None:
    """Each later arm's row against the first arm's row at the same settings: for sections
    where no row is a preset's own and the question is one arm against another at each
    setting (section 10's learned representatives against pooled ones at each m; section 12's
    methods on each dataset, its swept key being the data's imbalance)."""
    first = experiment.arms[0].label
    seed_spread = section_spread(grouped)
    for g in grouped:
        g["is_preset"] = False
    for reference in [g for g in grouped if g["arm"] == first]:
        judge(reference, [g for g in grouped if g["arm"] != first and all(
            k in g["point"] and same_value(g["point"][k], v)
            for k, v in reference["point"].items())], seed_spread)


def arm_ranges(grouped: list[dict]) -> dict[str, float]:
    """Each arm's range over its settings: max - min of its rows' mean k-NN (only arms with
    more than one row: an arm trained at one setting has no range)."""
    scores: dict[str, list[float]] = {}
    for g in grouped:
        scores.setdefault(g["arm"], []).append(g["knn_top1"])
    return {arm: max(values) - min(values) for arm, values in scores.items() if len(values) > 1}


def section_spread(grouped: list[dict]) -> float | None:
    """The section's seed spread, or None with one seed (no spread to judge by)."""
    return spread(grouped) if has_seed_spread(grouped) else None


def judge(reference: dict, others: list[dict], seed_spread: float | None) -> None:
    """``knn_difference`` and ``verdict`` for each of ``others`` against ``reference``; the
    yardstick is the section's seed spread, or with one seed (``None``) two standard errors of
    the test set at the reference's accuracy (kept as the reference's ``noise_points``)."""
    noise, beyond = ((seed_spread, "beyond the spread") if seed_spread is not None else
                     (two_standard_errors(reference["knn_top1"]), "beyond two standard errors"))
    reference["noise_points"] = noise
    for g in others:
        g["knn_difference"] = g["knn_top1"] - reference["knn_top1"]
        g["verdict"] = "noise" if abs(g["knn_difference"]) <= noise else beyond


def markdown(experiment: Experiment, grouped: list[dict], machines: list[tuple[dict, int]],
             command: str) -> str:
    keys = [k for k in experiment.swept_keys() if k != "run.seed"]
    arms = experiment.several_arms
    header = [*([experiment.arm_header] if arms else []), *(f"`{k}`" for k in keys), "k-NN (seeds)",
              *(["linear (seeds)"] if experiment.linear else []), "random init",
              "vs preset" if experiment.compare == "preset" else f"vs {experiment.arms[0].label}"]
    if "bam_entropies" in experiment.measures:
        header += ["source entropy", "target entropy"]
    if "attention" in experiment.measures:
        header += ["attention entropy, last layer", "CLS entropy, last layer",
                   "attention distance (px), layers 1..L", "attention diversity, layers 1..L"]
        header.append("attention effective rank, layers 1..L")
    if "dense" in experiment.measures:
        header += ["dense probe: all patches", "dense probe: foreground patches"]
    header.append("images/s")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for g in grouped:
        cells = [g["arm"]] if arms else []
        cells += [g["point"][k] + (" (preset)" if g.get("is_preset") else "") for k in keys]
        cells.append(_with_seeds(g, "knn_top1"))
        if experiment.linear:
            cells.append(_with_seeds(g, "linear_top1"))
        cells.append(f"{g['knn_floor']:.2f}")
        cells.append(f"{g['knn_difference']:+.2f} ({g['verdict']})" if "verdict" in g else "-")
        if "bam_entropies" in g:
            cells += [f"{g['bam_entropies']['source_entropy']:.2f}",
                      f"{g['bam_entropies']['target_entropy']:.2f}"]
        if "attention" in g:
            cells += [f"{g['attention']['attention_entropy'][-1]:.2f}",
                      f"{g['attention']['cls_entropy'][-1]:.2f}",
                      " / ".join(f"{v:.1f}" for v in g["attention"]["attention_distance"]),
                      " / ".join(f"{v:.2f}" for v in g["attention"]["attention_diversity"])]
            cells.append(" / ".join(f"{v:.1f}" for v in g["attention"]["attention_rank"]))
        if "dense" in g:
            cells += [f"{g['dense']['all_patches']:.2f}", f"{g['dense']['shape_patches']:.2f}"]
        cells.append(f"{g['images_per_second']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for g in grouped for s in g["seeds"]})
    yardstick = (f"spread (largest seed-to-seed k-NN difference of any row): "
                 f"{spread(grouped):.2f} points" if has_seed_spread(grouped) else
                 f"one seed, so a difference is noise inside two standard errors of the test "
                 f"set ({_standard_error_note(grouped, arms)})")
    notes = [f"Seeds {', '.join(map(str, seeds))}; {yardstick}. Budget: "
             f"{experiment.budget_text()}; weighted k-NN (k=20) on the preset's read-out "
             f"with the first {EVAL_TRAIN} training images as the bank and the first "
             f"{EVAL_TEST} test images scored."]
    if experiment.only or experiment.chosen_arms:
        subset = ", ".join([*(f"`{s}`" for s in experiment.only),
                            *([f"arms {', '.join(experiment.chosen_arms)}"]
                              if experiment.chosen_arms else [])])
        notes.append(f"A subset of the section ({subset}): only these rows were trained at this "
                     f"budget, to confirm a screened effect beside the rows it is judged against.")
    ranges_by_arm = arm_ranges(grouped) if arms else {}
    if ranges_by_arm:
        inside = section_spread(grouped)
        ranges = ", ".join(f"{arm} {value:.2f}" + (" (noise)" if inside is not None and
                                                   value <= inside else "")
                           for arm, value in ranges_by_arm.items())
        judged = "noise inside the spread" if inside is not None else \
            "one seed, so no spread to judge them by"
        notes.append(f"Each arm's range (its best row's k-NN less its worst's: how much it "
                     f"depends on the swept settings; {judged}): {ranges} points.")
    if "attention" in experiment.measures:
        uniform = grouped[0]["attention"]["uniform_entropy"]
        notes.append(f"Attention measures on the first 256 test images, mean over heads; "
                     f"uniform attention over the patches is {uniform:.2f} nats.")
        notes.append("Effective rank: of each head's patch-to-patch attention map (at most the "
                     "number of patches).")
    notes.append(machines_line(machines, command))
    notes.append(f"![{experiment.slug}](../benchmarks/results/experiments/{experiment.slug}.png)")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def _standard_error_note(grouped: list[dict], arms: bool) -> str:
    """The one-seed yardstick of each reference row, taken at its accuracy, as
    :func:`compare_rows` judged the rows by it (named by arm, or by setting where several
    rows of one arm are references)."""
    judged = [g for g in grouped if "noise_points" in g]
    if not judged:  # no reference row: the yardstick near the first row's accuracy
        return f"about {two_standard_errors(grouped[0]['knn_top1']):.2f} points"
    by_setting = len({g["arm"] for g in judged}) < len(judged)

    def name(g: dict) -> str:
        if by_setting:
            return " at " + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in g["point"].items()
                                      if k != "run.seed")
        return f" for {g['arm']}" if arms else ""

    return ", ".join(f"{g['noise_points']:.2f} points{name(g)}" for g in judged)


def _with_seeds(g: dict, score: str) -> str:
    if score not in g:
        return "-"
    each = g[f"{score}_each"]
    seeds = f" ({' / '.join(f'{v:.2f}' for v in each)})" if len(each) > 1 else ""
    return f"{g[score]:.2f}{seeds}"


def plot(experiment: Experiment, grouped: list[dict], path: Path) -> Path:
    """k-NN (and linear) of each setting: every seed a dot, the mean a bar; the random-init
    k-NN floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in experiment.swept_keys() if k != "run.seed"]
    labels = [(f"{g['arm']}\n" if experiment.several_arms else "")
              + "\n".join(f"{k.split('.')[-1]}={g['point'][k]}" for k in keys) for g in grouped]
    scores = ["knn_top1", *(["linear_top1"] if experiment.linear else [])]
    fig, axes = plt.subplots(1, len(scores), figsize=(max(5, 1.1 * len(grouped)) * len(scores),
                                                     3.6), squeeze=False)
    for axis, score in zip(axes[0], scores, strict=True):
        xs = range(len(grouped))
        axis.bar(xs, [g.get(score, 0) for g in grouped], color="C0", alpha=0.4)
        for x, g in zip(xs, grouped, strict=True):
            each = g.get(f"{score}_each", [])
            axis.scatter([x] * len(each), each, color="C0", s=14)
        values = [v for g in grouped for v in g.get(f"{score}_each", [])]
        if score == "knn_top1":  # the sweep's floor is a k-NN score
            floors = [g["knn_floor"] for g in grouped]
            axis.plot(xs, floors, "k--", linewidth=1, label="random init")
            axis.legend(fontsize=7)
            values += floors
        axis.set_ylim(min(values) - 2, max(values) + 1)
        axis.set_xticks(list(xs), labels, fontsize=7, rotation=15)
        axis.set_ylabel(f"{'k-NN' if score == 'knn_top1' else 'linear'} top-1 (%)")
    fig.suptitle(experiment.slug, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trained_on(rows: list[dict]) -> list[tuple[dict, int]]:
    """Each machine the rows' training runs recorded (CPU, thread count, torch), with its number
    of runs (rows that differ only in their evaluation share one run), in the order met."""
    counted: list[list] = []
    for run_dir in dict.fromkeys(row["run_dir"] for row in rows):
        machine = json.loads((Path(run_dir) / "metrics.json").read_text())["machine"]
        found = next((entry for entry in counted if entry[0] == machine), None)
        if found:
            found[1] += 1
        else:
            counted.append([machine, 1])
    return [(machine, count) for machine, count in counted]


def run_sweep_section(experiment: Experiment, args) -> str:
    rows = run_arms(experiment, args)
    grouped = in_grid_order(group_seeds(rows), experiment)
    compare_rows(grouped, experiment)
    machines = trained_on(rows)
    command = section_command(experiment, args)
    table = markdown(experiment, grouped, machines, command)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{experiment.slug}.json").write_text(json.dumps(
        {"section": experiment.slug, "machine": machines[0][0], "command": command,
         "machines": [{**machine, "runs": count} for machine, count in machines],
         "rows": grouped, "points": rows}, indent=2))
    plot(experiment, grouped, out / f"{experiment.slug}.png")
    return table


def section_command(experiment: Experiment, args) -> str:
    extra = f" --dataset {args.dataset}" if args.dataset else ""
    extra += " --full-budget" if experiment.full else ""
    extra += "".join(f" --only {shlex.quote(setting)}" for setting in experiment.only)
    extra += " --arms " + " ".join(experiment.chosen_arms) if experiment.chosen_arms else ""
    default = FULL_SEEDS if experiment.full else SEEDS
    seeds = "" if tuple(args.seeds) == default else " --seeds " + " ".join(map(str, args.seeds))
    return f"python -m benchmarks.experiments {experiment.name}{extra}{seeds} --docs"


# ---------------------------------------------------------------- the theory sections


def theory_depth(args) -> str:
    """Section 11: the synthetic experiment with 1 (the paper's), 2 and 4 attention layers."""
    return _theory_table(args, "theory-depth", [(layers, "softmax") for layers in (1, 2, 4)])


def theory_linear(args) -> str:
    """Section 13: the same contrast with linear attention, one and two layers."""
    return _theory_table(args, "theory-linear-attention",
                         [(1, "softmax"), (1, "linear"), (2, "linear")])


def _same_theory_run(result: dict, settings, imbalances: list[float]) -> bool:
    return result["settings"] == settings.__dict__ and result["imbalances"] == imbalances


def _theory_table(args, name: str, models: list[tuple[int, str]]) -> str:
    from attnssl.theory import DataModel, TrainSettings, run_theory
    from attnssl.train.environment import machine_description

    out = Path(args.results) / "theory"  # runs shared by the theory sections
    rows = []
    for layers, kind in models:
        for seed in args.seeds:
            settings = TrainSettings(steps=args.theory_steps, lr=0.5, seed=seed, attention=kind,
                                     layers=layers, log_every=max(1, args.theory_steps // 30))
            folder = out / f"{kind}-layers{layers}-seed{seed}"
            found = folder / "theory.json"
            if found.is_file() and _same_theory_run(json.loads(found.read_text()), settings,
                                                    args.imbalance):
                result = json.loads(found.read_text())
            else:
                result = run_theory(folder, DataModel(seed=0), settings, args.imbalance)
            for curve in result["curves"]:
                rows.append({"attention": kind, "layers": layers, "seed": seed,
                             "objective": curve["objective"], "imbalance": curve["imbalance"],
                             "final": curve["metrics"][-1]})
    machine = machine_description()
    imbalance = "" if args.imbalance == [2.0] else \
        " --imbalance " + " ".join(f"{v:g}" for v in args.imbalance)
    command = f"python -m benchmarks.experiments {name}{imbalance} --docs"
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, "command": command,
                                                  "rows": rows}, indent=2))
    lines = ["| attention | layers | objective | imbalance | local query: own area, layers 1..L "
             "| diversity, layers 1..L | seed spread (own area, last layer) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keyed: dict[tuple, list[dict]] = {}
    for row in rows:
        keyed.setdefault((row["attention"], row["layers"], row["objective"], row["imbalance"]),
                         []).append(row["final"])
    for (kind, layers, objective, imbalance), finals in keyed.items():
        per_layer = _mean_tree([f["per_layer"] for f in finals])
        last = [f["local_own_area"] for f in finals]
        lines.append(f"| {kind} | {layers} | {objective.upper()} | {imbalance:g} | "
                     + " / ".join(f"{m['local_own_area']:.2f}" for m in per_layer) + " | "
                     + " / ".join(f"{m['diversity']:.2f}" for m in per_layer)
                     + f" | {max(last) - min(last):.3f} |")
    return (("\n".join(lines)) + f"\n\nFinal step ({args.theory_steps}) of each run, mean over "
            f"seeds {', '.join(map(str, args.seeds))}; local areas' own-area mass is 1/12 "
            f"(0.08) for uniform attention.\n\n" + machine_line(machine, command) + "\n\n"
            + " ".join(f"![{kind}, {layers} layers](../benchmarks/results/experiments/theory/"
                       f"{kind}-layers{layers}-seed{args.seeds[0]}/theory.png)"
                       for layers, kind in models))


# ---------------------------------------------------------------- the sections

BAM = "bam_fashion_mnist"
# BAM's sections pin BAM_OFFICIAL: they study the official method, as the preset had it when
# the sections were run
IMBALANCE = ("data.dataset=imbalance", "data.synthetic_size=12288",
             "data.synthetic_imbalance=1,4,16")
# UDI's preset does not learn at the screening budget (section 9's screen ends at its untrained
# floor), so its questions of the blend and the windows are asked on the full B1 v2 budget, one
# seed, where it does (section 9's full budget: 10 points over the floor)
UDI_BUDGET = {"budget": (), "full": True}
EXPERIMENTS = (
    Experiment(
        "bam-positive-masking", "BAM",
        "Does masking each image's own views out of the target help, and does partial masking "
        "(each image masked with probability 0.5) sit between on and off?",
        (_arm(BAM, *BAM_OFFICIAL, "method.positive_masking_prob=1,0.5,0"),), linear=True,
        measures=("bam_entropies", "attention")),
    Experiment(
        "bam-normalization", "BAM",
        "Global against local Sinkhorn normalisation with two real processes (local: each "
        "process balances its own block of the batch).",
        (_arm(BAM, *BAM_OFFICIAL, "trainer.accelerator=cpu", "trainer.devices=2",
              "method.normalization=global,local"),), linear=True,
        measures=("bam_entropies",)),
    Experiment(
        "bam-sinkhorn-iters", "BAM",
        "Is balancing needed: the plain softmax of the teacher's similarities (0 iterations) "
        "against 1, 3 (the official) and 10 Sinkhorn iterations.",
        (_arm(BAM, *BAM_OFFICIAL, "method.sinkhorn_iters=0,1,3,10"),), linear=True,
        measures=("bam_entropies",)),
    Experiment(
        "bam-entropy-gap", "BAM",
        "The entropy gap between source and target: source temperature against Sinkhorn eps.",
        (_arm(BAM, *BAM_OFFICIAL, "method.temperature=0.05,0.1,0.2",
              "method.sinkhorn_eps=0.025,0.05,0.1"),),
        measures=("bam_entropies",)),
    Experiment(
        "bam-batch-size", "BAM",
        "Does BAM keep gaining with the batch (256 to 2,048 at an equal number of images "
        "seen)? The peak learning rate follows the linear scaling rule (lr x batch / 256, as "
        "BAM's and DINO's code), so batch 256 is the preset.",
        (_arm(BAM, *BAM_OFFICIAL, "optim.lr_scaling_batch=256",
              "optim.batch_size=256,512,1024,2048"),),
        measures=("bam_entropies",)),
    Experiment(
        "bam-vs-simclr-views", "BAM",
        "Which method depends more on the augmentations: four view sets for BAM and SimCLR "
        "(crops and flips; + brightness/contrast jitter, the presets' set; + blur; + both).",
        tuple(_arm(preset, *pinned, "views.color_jitter_prob=0.0,0.8",
                   "views.blur_prob=[0.0,0.0],[1.0,0.1]")
              for preset, pinned in ((BAM, BAM_OFFICIAL), ("simclr_fashion_mnist", ())))),
    Experiment(
        "udi-alpha", "UDI",
        "The blend alpha of the multimodal target (patch share) against the read-out: the "
        "k-NN against linear trade-off on cls, cls+ and both.",
        (_arm("udi_fashion_mnist", "method.alpha=0,0.25,0.5,0.75,1",
              "eval.features=cls,cls_plus,cls+cls_plus"),), linear=True, **UDI_BUDGET),
    Experiment(
        "udi-sampling-windows", "UDI",
        "Stratified sampling's window sizes on the global and local grids, against sampling "
        "every patch (windows of 1).",
        (_arm("udi_fashion_mnist", "method.sampling_window_global=1,2,3",
              "method.sampling_window_local=1,2"),), **UDI_BUDGET),
    Experiment(
        "udi-shared-head", "UDI",
        "One head shared by the image and patch levels (the official) against a head for each, "
        "with the dense patch probe.",
        (_arm("udi_fashion_mnist", "method.patch_head=shared,separate"),), linear=True,
        measures=("dense",)),
    Experiment(
        "cbsa-representatives", "CBSA",
        "The number of representatives m, and representatives pooled from the grid against "
        "learned ones: k-NN, images/s and the rank of the attention maps (the paper argues "
        "pooling keeps the rank). BAM's preset with the attention swapped.",
        (_arm(BAM, *BAM_OFFICIAL, "model.attention=cbsa", "model.cbsa_pool=2,4,7",
              label="pooled"),
         *(_arm(BAM, *BAM_OFFICIAL, "model.attention=cbsa_learned",
                f"model.cbsa_learned_std={std}", "model.cbsa_pool=2,4,7",
                label=f"learned-std{std}") for std in ("0.02", "1"))),
        measures=("attention",), arm_header="representatives", compare="arms"),
    Experiment(
        "theory-depth", "theory",
        "Does the contrast hold past one layer: MAE against contrastive learning on stacks of "
        "2 and 4 attention layers?", run=theory_depth),
    Experiment(
        "imbalance-vits", "theory",
        "Real ViTs on images whose shared global grating is 1, 4 and 16 times as strong as the "
        "class shape: does MAE keep the local (class) feature that SimCLR loses as the "
        "imbalance grows, and how do attention distance and diversity per layer follow?",
        tuple(_arm(preset, *IMBALANCE) for preset in ("mae_fashion_mnist",
                                                       "simclr_fashion_mnist")),
        measures=("attention",), compare="arms"),
    Experiment(
        "theory-linear-attention", "theory",
        "The same contrast with linear attention (Katharopoulos et al. 2020): the synthetic "
        "model.", run=theory_linear),
    Experiment(
        "imbalance-vits-linear", "theory",
        "The imbalance experiment on real ViTs with linear attention in every block.",
        tuple(_arm(preset, "model.attention=linear", *IMBALANCE)
              for preset in ("mae_fashion_mnist", "simclr_fashion_mnist")),
        measures=("attention",), compare="arms"),
)
BY_NAME = {e.name: e for e in EXPERIMENTS}
# minutes on the 2-core reference machine at one thread: points times a point's training (the
# MAE and SimCLR presets' four samples and views per image cost about 3.5 and 2 times one's)
# UDI's full-budget sections at the 2-core Xeon's speed: about 45 minutes a point, and up to
# 2.5 hours where section 8's windows of 1 sample every patch
MINUTES = {"bam-positive-masking": 75, "bam-normalization": 60, "bam-sinkhorn-iters": 100,
           "bam-entropy-gap": 220, "bam-batch-size": 100, "bam-vs-simclr-views": 300,
           "udi-alpha": 255, "udi-sampling-windows": 520, "udi-shared-head": 80,
           "cbsa-representatives": 255, "theory-depth": 30, "imbalance-vits": 230,
           "theory-linear-attention": 15, "imbalance-vits-linear": 230}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", nargs="?", help="section name (--list shows them)")
    parser.add_argument("--list", action="store_true", help="list the sections and stop")
    parser.add_argument("--dataset", help="rerun on this dataset (data.dataset=NAME)")
    parser.add_argument("--data-root", help="folder holding the dataset")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help=f"default: {' '.join(map(str, SEEDS))}, or "
                             f"{' '.join(map(str, FULL_SEEDS))} with --full-budget")
    parser.add_argument("--full-budget", action="store_true",
                        help="train on the full B1 v2 budget (60,000 images, 5 epochs) to confirm "
                             "a screened effect; writes SECTION-full")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                        help="train only these of a swept key's values (repeat for other "
                             "keys): a confirmation of one screened effect with the rows it "
                             "is judged against; writes SECTION[-full]-only-...")
    parser.add_argument("--arms", nargs="+", default=[], metavar="LABEL",
                        help="train only these arms of a section with several")
    parser.add_argument("--threads", type=int, default=1, help="threads of each point")
    parser.add_argument("--workers", type=int, default=1,
                        help="train this many points side by side, across the arms, each in "
                             "its own process (workers times threads: at most the cores)")
    parser.add_argument("--runs-dir", default="runs/experiments")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--theory-steps", type=int, default=3000)
    parser.add_argument("--imbalance", type=float, nargs="+", default=[2.0],
                        help="theory sections: strengths of the global feature")
    parser.add_argument("--docs", "--readme", action="store_true", dest="docs",
                        help="write the table into its block of docs/experiments.md")
    args = parser.parse_args()
    if args.list or not args.section:
        for e in EXPERIMENTS:
            budget = " (full budget)" if e.full else ""
            print(f"{e.name:<28} {e.paper:<7} ~{MINUTES[e.name]:>3} min  {e.question}{budget}")
        return
    if args.section not in BY_NAME:
        raise SystemExit(f"unknown section {args.section!r}; known: {', '.join(BY_NAME)}")
    experiment = BY_NAME[args.section]
    if args.dataset or args.data_root:
        check_dataset_applies(experiment)
    if args.full_budget:
        experiment = on_full_budget(experiment)
    experiment = narrowed(experiment, args.only, args.arms)
    if args.seeds is None:
        args.seeds = list(FULL_SEEDS if experiment.full else SEEDS)
    if args.docs:
        readme_block_holder(f"EXPERIMENT-{experiment.slug}")
    if experiment.run:  # the theory model trains in this process
        import torch

        torch.set_num_threads(args.threads)
    from attnssl.sweep import SweepStopped, SweepWorkerDied, unfinished_sweep_exit

    try:
        table = experiment.run(args) if experiment.run else run_sweep_section(experiment, args)
    except (SweepStopped, SweepWorkerDied) as ended:
        raise SystemExit(unfinished_sweep_exit(ended, "section")) from None
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{experiment.slug}.md").write_text(table + "\n")
    print(table)
    if args.docs:
        replace_readme_block(f"EXPERIMENT-{experiment.slug}", table)


if __name__ == "__main__":
    main()
