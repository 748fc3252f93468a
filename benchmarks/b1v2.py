"""Protocol B1 v2 (docs/benchmarks.md): every method with its own preset on Fashion-MNIST.

The same backbone (timm ViT 28 px, patch 4, width 128, depth 4, 4 heads), the 60,000 training
images, batch 256, 5 epochs; each method's preset (``configs/METHOD_fashion_mnist.yaml``) sets
its views, schedule, head, precision (``auto``) and read-out. Rows:

- ``METHOD``: the preset as it is;
- ``METHOD-crops-flips``: the preset with every photometric change off (crops and flips only,
  B1 v1's views rule), to show what the views buy; only for presets that have one (MAE's
  official views are crops and flips already, so its row would be the preset's);
- ``METHOD-20ep``: the preset for 20 epochs (trained in pieces with ``--max-steps``);
- the rows of ``VARIANTS``: a preset with named changes, kept where a preset choice costs
  time (MAE's repeated sampling, BAM's and SimCLR's four views) or departs from the official
  recipe (BAM's positive masking, crops and EMA teacher), to show what it buys, and second
  seeds.

Each row is scored by the weighted k-NN (k=20, T=0.07) and the linear probe on the preset's
read-out, beside the same k-NN of the same backbone untrained (same seed, same read-out) and of
raw pixels. Every row trains in ``runs/b1v2/ROW`` and continues from its newest checkpoint when
rerun, so ``--max-steps N`` trains at most N more steps per row and call.

    python -m benchmarks.b1v2 --readme                          # every 5-epoch row
    python -m benchmarks.b1v2 --rows bam-20ep --max-steps 1000  # a long row, one piece
    python -m benchmarks.b1v2 --table-only --readme              # the table from the results file
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from attnssl.config import (
    config_to_dict,
    describe_differences,
    differing_settings,
    load_config,
    with_defaults,
)
from attnssl.methods import method_names
from attnssl.precision import accelerator_type, resolve_precision
from attnssl.runs.checkpoint import load_training_checkpoint, newest_readable_checkpoint
from attnssl.runs.trained import config_from_checkpoint
from attnssl.train.environment import machine_description
from attnssl.train.trainer import pretrain
from benchmarks.b1_pretrain import raw_pixel_knn
from benchmarks.helpers import (
    BAM_OFFICIAL,
    BAM_PLAIN_PROJECTOR,
    BAM_TEACHER,
    BAM_TIMM_STEM,
    MAE_ONE_SAMPLE,
    ROOT,
    SIMCLR_TWO_VIEWS,
    machine_line,
    replace_readme_block,
)

METHODS = tuple(method_names())  # every registered method has a Fashion-MNIST preset
CROPS_AND_FLIPS = ["views.color_jitter_prob=0.0", "views.gamma_prob=0.0",
                   "views.blur_prob=[0.0,0.0]", "views.local_blur_prob=0.0",
                   "views.solarize_prob=[0.0,0.0]", "views.erasing_prob=0.0"]
LONG = ("bam", "simclr", "mae")
BAM_WD_SCHEDULE = ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4"]
FROZEN_PATCHES = ["model.pos_embed=sincos", "model.freeze_patch_embed=true"]
# name -> (preset, overrides): what a preset's choice buys, each row beside the preset's own
VARIANTS = {
    "bam-seed1": ("bam_fashion_mnist", ["run.seed=1"]),  # the preset on a second seed
    # the preset up to its fourteenth round: constant weight decay 0.05 and timm's learned stem
    # (BAM_TIMM_STEM); every BAM row below pins it, as it was trained with it
    "bam-timm-stem": ("bam_fashion_mnist", BAM_TIMM_STEM),
    "bam-timm-stem-seed1": ("bam_fashion_mnist", [*BAM_TIMM_STEM, "run.seed=1"]),
    "bam-timm-stem-20ep": ("bam_fashion_mnist", [*BAM_TIMM_STEM, "optim.epochs=20"]),
    # the fifteenth round's two official choices one at a time: the weight decay 0.04 rising to
    # 0.4 on a cosine, and the fixed sine-cosine positions with a frozen patch projection
    "bam-wd-schedule": ("bam_fashion_mnist", [*BAM_TIMM_STEM, *BAM_WD_SCHEDULE]),
    "bam-wd-schedule-seed1": ("bam_fashion_mnist",
                              [*BAM_TIMM_STEM, *BAM_WD_SCHEDULE, "run.seed=1"]),
    "bam-frozen-patches": ("bam_fashion_mnist", [*BAM_TIMM_STEM, *FROZEN_PATCHES]),
    # the preset's choices up to its eleventh round, with the projector it had then (no batch
    # norm, BAM_PLAIN_PROJECTOR): what the twelfth round's batch norms buy, on two seeds
    "bam-plain-projector": ("bam_fashion_mnist", [*BAM_PLAIN_PROJECTOR, *BAM_TIMM_STEM]),
    "bam-plain-projector-seed1": ("bam_fashion_mnist",
                                  [*BAM_PLAIN_PROJECTOR, *BAM_TIMM_STEM, "run.seed=1"]),
    "bam-2v": ("bam_fashion_mnist", ["views.global_crops=2", *BAM_PLAIN_PROJECTOR,
                                     *BAM_TIMM_STEM]),
    "bam-6v": ("bam_fashion_mnist", ["views.global_crops=6", *BAM_PLAIN_PROJECTOR,
                                     *BAM_TIMM_STEM]),
    "bam-teacher": ("bam_fashion_mnist", [*BAM_TEACHER, *BAM_PLAIN_PROJECTOR, *BAM_TIMM_STEM]),
    "bam-teacher-2v": ("bam_fashion_mnist", [*BAM_TEACHER, "views.global_crops=2",
                                             *BAM_PLAIN_PROJECTOR, *BAM_TIMM_STEM]),
    # what BAM's views buy, at two views as SimCLR's row simclr-2v-crops-flips (against bam-2v)
    "bam-2v-crops-flips": ("bam_fashion_mnist", ["views.global_crops=2", *CROPS_AND_FLIPS,
                                                 *BAM_PLAIN_PROJECTOR, *BAM_TIMM_STEM]),
    "bam-masked": ("bam_fashion_mnist", BAM_OFFICIAL),
    "bam-masked-20ep": ("bam_fashion_mnist", [*BAM_OFFICIAL, "optim.epochs=20"]),
    "mae-1x": ("mae_fashion_mnist", MAE_ONE_SAMPLE),
    "mae-1x-20ep": ("mae_fashion_mnist", [*MAE_ONE_SAMPLE, "optim.epochs=20"]),
    "mae-seed1": ("mae_fashion_mnist", ["run.seed=1"]),  # the preset on a second seed
    "simclr-seed1": ("simclr_fashion_mnist", ["run.seed=1"]),
    "simclr-2v": ("simclr_fashion_mnist", SIMCLR_TWO_VIEWS),
    "simclr-6v": ("simclr_fashion_mnist", ["views.global_crops=6"]),
    # SimCLR v2's deeper projector (Chen et al. 2020b: three layers), the preset's width
    "simclr-projector-3l": ("simclr_fashion_mnist", ["method.projector_layers=3"]),
    # MoCo v3's stem for contrastive ViTs (Chen, Xie and He 2021), as BAM's preset took it:
    # fixed sine-cosine positions and a frozen patch projection
    "simclr-frozen-patches": ("simclr_fashion_mnist", FROZEN_PATCHES),
    # SimCLR's projector width (Chen et al. 2020: a 2048-wide hidden layer) against the
    # preset's 512 (four times the backbone's width)
    "simclr-projector-2048": ("simclr_fashion_mnist", ["method.projector_hidden=2048"]),
    # the official code's output batch norm (scale, no shift, no bias; google-research/simclr)
    "simclr-last-bn": ("simclr_fashion_mnist", ["method.projector_last_batchnorm=true"]),
    "simclr-2v-crops-flips": ("simclr_fashion_mnist", [*SIMCLR_TWO_VIEWS, *CROPS_AND_FLIPS]),
}


def has_photometric_views(preset: str) -> bool:
    """Whether turning the photometric changes off changes the views the preset makes (the
    local crops' settings count only where there are local crops)."""
    views = load_config(preset).views
    plain = load_config(preset, CROPS_AND_FLIPS).views
    inert = {"local_blur_prob"} if views.local_crops == 0 else set()
    return any(getattr(views, key) != getattr(plain, key)
               for key in type(views).model_fields if key not in inert)


def rows_known() -> dict[str, tuple[str, list[str]]]:
    rows = {}
    for method in METHODS:
        preset = f"{method}_fashion_mnist"
        rows[method] = (preset, [])
        if has_photometric_views(preset):
            rows[f"{method}-crops-flips"] = (preset, CROPS_AND_FLIPS)
        if method in LONG:
            rows[f"{method}-20ep"] = (preset, ["optim.epochs=20"])
        rows |= {name: row for name, row in VARIANTS.items() if row[0] == preset}
    return rows


def train_row(name: str, row: tuple[str, list[str]], args) -> dict:
    preset, overrides = row
    overrides = [*overrides, f"run.out_dir={args.runs_dir}", f"run.name={name}",
                 "trainer.progress_bar=false"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.threads:
        overrides.append(f"trainer.num_threads={args.threads}")
    config = load_config(preset, overrides)
    run_dir = Path(args.runs_dir) / name
    check_row_matches_preset(run_dir, config)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and "eval" in json.loads(metrics_file.read_text()):
        metrics = json.loads(metrics_file.read_text())
        ev = metrics["eval"]
        if (ev["features"], ev.get("blocks", 1)) != (config.eval.features, config.eval.blocks):
            metrics["eval"] = rescore(run_dir, config)  # the preset's read-out changed since
            metrics_file.write_text(json.dumps(metrics, indent=2))
        return row_from(name, config, metrics)
    found = newest_readable_checkpoint(run_dir)
    if found is not None:  # continue the row exactly, with its own settings
        pieces = ["trainer.progress_bar=false"]
        if args.threads:
            pieces.append(f"trainer.num_threads={args.threads}")
        # the checkpoint holds the limit of the piece that wrote it: set this call's (or none)
        pieces.append(f"trainer.max_steps={args.max_steps or 'null'}")
        config = config_from_checkpoint(load_training_checkpoint(found, lazy=True), pieces)
    elif args.max_steps:
        config.trainer.max_steps = args.max_steps
    metrics = pretrain(config, resume=str(found) if found else None)
    if not metrics["finished"]:
        return {"row": name, "in_progress": f"step {metrics['step']} of {metrics['total_steps']}"}
    return row_from(name, config, json.loads(metrics_file.read_text()))


def check_row_matches_preset(run_dir: Path, config) -> None:
    """Refuse a row folder trained with other settings than the preset's now: its score would
    stand in the table for a recipe that was not run. Read-out, machine and run-folder settings
    may differ (the row is rescored or continued), the seed may not, and a row trained in the
    precision that ``auto`` picks here matches a preset's ``auto``; a setting added since the
    row was trained counts at its default. Nothing is moved or deleted."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    trained = with_defaults(yaml.safe_load(saved.read_text()) or {})
    auto_here = resolve_precision("auto", accelerator_type(config.trainer.accelerator))
    same_precision = (config.trainer.precision == "auto"
                      and trained["trainer"]["precision"] == auto_here)
    changed = {k: values for k, values in differing_settings(config_to_dict(config), trained).items()
               if not (k.startswith("run.") and k != "run.seed")
               and not (k == "trainer.precision" and same_precision)}
    if changed:
        listed = describe_differences(changed, now="preset now")
        raise SystemExit(f"{run_dir} was trained with other settings than its preset has now: "
                         f"{listed}. Move the folder away (or pass another --runs-dir) to train "
                         f"the row again.")


def rescore(run_dir: Path, config) -> dict:
    """The evaluation of a trained row with the preset's current ``eval`` settings."""
    from attnssl.eval.evaluate import evaluate_backbone, load_trained_backbone

    eval_settings = [f"eval.{k}={json.dumps(v)}" for k, v in
                     config.eval.model_dump(mode="json").items() if k != "finetune"]
    loaded = load_trained_backbone(run_dir, eval_settings)
    return evaluate_backbone(loaded.backbone, loaded.config, loaded.train, loaded.test)


def row_from(name: str, config, metrics: dict) -> dict:
    ev = metrics["eval"]
    readout = ev["features"] + (f", last {ev['blocks']} blocks" if ev.get("blocks", 1) > 1 else "")
    return {"row": name, "readout": readout, "precision": metrics["precision"],
            "threads": metrics["machine"]["threads"],
            "epochs": config.optim.epochs, "knn_top1": ev["knn_top1"],
            "linear_top1": ev.get("linear_top1"), "knn_top1_random_init": ev["knn_top1_random_init"],
            "images_per_second": metrics["images_per_second"],
            "train_minutes": metrics["train_seconds"] / 60, "machine": metrics["machine"]}


DEFAULT_OUT = ROOT / "benchmarks" / "results" / "b1v2.json"
LEARNED = 10.0  # k-NN points over the untrained backbone for a row to count as learned


def verdict(row: dict, raw: float) -> str:
    """Whether the row learned (at least ``LEARNED`` points over its random-init floor), and
    where it stands against raw pixels."""
    gain = row["knn_top1"] - row["knn_top1_random_init"]
    learned = ("learned" if gain >= LEARNED else "did not learn" if gain <= 0
               else f"under the +{LEARNED:.0f} that counts as learned")
    where = "at or above raw pixels" if row["knn_top1"] >= raw else "below raw pixels"
    return f"{learned} ({gain:+.1f} over random init); {where}"


def table(rows: list[dict], raw: float) -> str:
    lines = ["| row | read-out | precision | epochs | k-NN | linear | random-init k-NN | "
             "images/s | threads | train min | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "in_progress" in r:
            lines.append(f"| {r['row']} | in progress: {r['in_progress']} |" + " |" * 9)
            continue
        linear = "-" if r["linear_top1"] is None else f"{r['linear_top1']:.2f}"
        lines.append(
            f"| {r['row']} | {r['readout']} | {r['precision']} | {r['epochs']} | "
            f"{r['knn_top1']:.2f} | {linear} | {r['knn_top1_random_init']:.2f} | "
            f"{r['images_per_second']:.0f} | {r['threads']} | {r['train_minutes']:.1f} | "
            f"{verdict(r, raw)} |")
    lines.append(f"| raw pixels (floor) | 784 pixels | - | - | {raw:.2f} | - | - | - | - | - | - |")
    return "\n".join(lines)


def regenerate_command(rows: list[str], out: Path) -> str:
    """The command that trains the table's rows into ``out`` (named where it is not the
    default, as for another machine's table; relative to the repository where inside it)."""
    command = "python -m benchmarks.b1v2 --rows " + " ".join(rows)
    out = Path(out).resolve()
    if out != DEFAULT_OUT:
        command += f" --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = rows_known()
    parser.add_argument("--rows", nargs="+", default=list(METHODS), choices=list(known))
    parser.add_argument("--max-steps", type=int, default=None,
                        help="train at most N more steps per unfinished row in this call")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per row (trainer.num_threads; default: all cores)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "b1v2"))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--readme", action="store_true", help="replace the B1 v2 table in README.md")
    parser.add_argument("--block", default=None,
                        help="replace the table between <!-- BLOCK:START --> and <!-- BLOCK:END "
                             "--> in README.md or docs/ (--readme is --block B1V2); for a "
                             "results file of another machine (--out)")
    parser.add_argument("--table-only", action="store_true",
                        help="train and score nothing: rebuild the table from the rows in --out")
    args = parser.parse_args()

    out = Path(args.out)
    if args.table_only and not out.is_file():
        raise SystemExit(f"--table-only reads the rows of --out, and {out} does not exist")
    stored = json.loads(out.read_text()) if out.is_file() else {}
    previous = stored.get("rows", [])
    raw = (stored["raw_pixel_knn_top1"] if args.table_only
           else raw_pixel_knn(data_root=args.data_root))
    new = [] if args.table_only else [train_row(name, known[name], args) for name in args.rows]
    measured = {r["row"] for r in new}
    rows = [r for r in previous if r["row"] not in measured] + new
    rows.sort(key=lambda r: list(known).index(r["row"]) if r["row"] in known else len(known))
    # the CPU's name and whether it runs bf16 natively: "AMD EPYC" alone is Zen 3 or Zen 4
    machines = {f"{r['machine']['cpu']} (bf16 {r['machine'].get('cpu_bf16', 'unknown')})"
                for r in rows if "machine" in r}
    if len(machines) > 1:
        raise SystemExit(f"rows from several machines ({', '.join(sorted(machines))}) cannot share "
                         f"one table; use another --out")
    markdown = table(rows, raw)
    print(markdown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"raw_pixel_knn_top1": raw, "rows": rows}, indent=2))
    block = args.block or ("B1V2" if args.readme else None)
    if block:
        machine = next((r["machine"] for r in rows if "machine" in r), machine_description())
        threads = {r["threads"] for r in rows if "threads" in r}
        if len(threads) > 1:  # the table's column names each row's
            machine = {**machine, "threads": "per row: " + " or ".join(map(str, sorted(threads)))}
        command = regenerate_command([r["row"] for r in rows], out)
        replace_readme_block(block, machine_line(machine, command) + "\n\n" + markdown)


if __name__ == "__main__":
    main()
