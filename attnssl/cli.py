"""``attnssl pretrain | eval | sweep | analyze | export | shard | theory | presets``."""

from __future__ import annotations

import argparse
import json
import pickle
import sys

from attnssl.config import (
    ConfigError,
    check_resume_overrides,
    load_config,
    parse_override,
    preset_names,
    resume_overridable,
)
from attnssl.data.datasets import DatasetNotFoundError
from attnssl.errors import RunStopped

DEFAULT_PRESET = "bam_fashion_mnist"
USER_ERRORS = (
    ConfigError, DatasetNotFoundError, FileNotFoundError, FileExistsError, ValueError,
    pickle.UnpicklingError, RunStopped,
)


def _with_data_root(overrides: list[str], data_root: str | None) -> list[str]:
    return overrides + ([f"data.root={data_root}"] if data_root else [])


def _print_eval(result: dict) -> None:
    ev = result
    line = f"k-NN top-1 ({ev['features']}, k={ev['knn_k']}): {ev['knn_top1']:.2f} %"
    if "knn_top1_random_init" in ev:
        line += f"   random-init backbone: {ev['knn_top1_random_init']:.2f} %"
    print(line)
    if "linear_top1" in ev:
        print(f"linear probe top-1 ({ev['features']}): {ev['linear_top1']:.2f} %")
    if "finetune_top1" in ev:
        print(f"fine-tuned top-1: {ev['finetune_top1']:.2f} %")
    for share, row in ev.get("low_shot", {}).items():
        scores = ", ".join(f"{k.removesuffix('_top1')} {v:.2f} %" for k, v in row.items()
                           if k.endswith("_top1"))
        print(f"low-shot, {share} of the labels ({row['train_images']} images): {scores}")


def cmd_pretrain(args) -> int:
    from attnssl.runs.checkpoint import load_training_checkpoint, resolve_checkpoint
    from attnssl.runs.trained import config_from_checkpoint
    from attnssl.train.trainer import pretrain

    overrides = _with_data_root(args.overrides, args.data_root)
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its own config; drop --config "
                              "(key=value overrides still apply)")
        check_resume_overrides(overrides)
    if args.resume:
        args.resume = str(resolve_checkpoint(args.resume))  # pretrain then has the file itself
        trained = load_training_checkpoint(args.resume, lazy=True)
        kept = [o for o in overrides if resume_overridable(".".join(parse_override(o)[0]))]
        config = config_from_checkpoint(trained, kept)
    else:
        config = load_config(args.config or DEFAULT_PRESET, overrides)
    metrics = pretrain(config, resume=args.resume)
    if metrics["rank"] == 0:
        print(f"run folder: {metrics['run_dir']}")
        print(f"steps {metrics['step']}/{metrics['total_steps']}, "
              f"{metrics['images_per_second']:.1f} images/s")
        if metrics.get("stopped_by"):
            print(f"stopped by {metrics['stopped_by']} at step {metrics['step']}, checkpoint "
                  f"saved; continue with: attnssl pretrain --resume {metrics['run_dir']}")
            return 130 if metrics["stopped_by"] == "SIGINT" else 143
        if not metrics["finished"]:
            limit = " trainer.max_steps=null" if config.trainer.max_steps else ""
            print(f"stopped before the end (trainer.max_steps); continue to the end with: "
                  f"attnssl pretrain --resume {metrics['run_dir']}{limit}")
        if "eval" in metrics:
            _print_eval(metrics["eval"])
    return 0


def cmd_eval(args) -> int:
    from attnssl.eval.evaluate import evaluate_backbone, load_trained_backbone

    loaded = load_trained_backbone(args.target, _with_data_root(args.overrides, args.data_root))
    result = evaluate_backbone(loaded.backbone, loaded.config, loaded.train, loaded.test)
    result["checkpoint"] = str(loaded.checkpoint)
    result["step"] = loaded.step
    _print_eval(result)
    from attnssl.runs.checkpoint import atomic_write
    from attnssl.runs.folder import unused_result_path

    out = unused_result_path(loaded.run_dir, f"eval-step-{result['step']:08d}")
    atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2)))
    print(f"wrote {out}")
    return 0


def cmd_analyze(args) -> int:
    from pathlib import Path

    from attnssl.analysis import analyze_run

    result = analyze_run(args.target, Path(args.out) if args.out else None,
                         _with_data_root(args.overrides, args.data_root), images=args.images,
                         flow_images=args.flow_images)
    print(result["summary_table"])
    print(f"wrote {result['report']}")
    return 0


def cmd_shard(args) -> int:
    from pathlib import Path

    from attnssl.data.shards import print_report, write_shards

    report = write_shards(args.src, args.dst, args.image_size, args.chunk_mb)
    print_report(report, Path(args.dst))
    print(f"train from them: attnssl pretrain -c PRESET data.dataset=shards data.root={args.dst}")
    return 0


def cmd_export(args) -> int:
    from attnssl.export import export_backbone

    out = export_backbone(args.target, args.out, _with_data_root(args.overrides, args.data_root))
    description = json.loads((out / "config.json").read_text())
    print(f"wrote {out}/model.safetensors and config.json")
    if description["attnssl"]["timm_loadable"]:
        print(f'timm: timm.create_model("local-dir:{out}", pretrained=True)')
    print(f'attnssl: attnssl.export.load_exported("{out}")')
    return 0


def cmd_theory(args) -> int:
    from pathlib import Path

    from attnssl.theory import DataModel, TrainSettings, run_theory

    out = Path(args.out)
    data = DataModel(grid=args.grid, local_scale=args.local_scale, seed=args.seed)
    settings = TrainSettings(steps=args.steps, lr=args.lr, mask_prob=args.mask_prob,
                             log_every=max(1, args.steps // 30), seed=args.seed,
                             attention=args.attention, layers=args.layers)
    run_theory(out, data, settings, args.imbalance)
    print((out / "theory.md").read_text(), end="")
    print(f"wrote {out}/theory.json, theory.md, theory.png")
    return 0


def cmd_sweep(args) -> int:
    from attnssl.sweep import main_sweep

    return main_sweep(args.config, _with_data_root(args.settings, args.data_root), args.out,
                      args.trials, args.eval_train, args.eval_test, args.linear, args.seed,
                      args.workers)


def cmd_presets(args) -> int:
    from attnssl.config import preset_summary

    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_summary(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnssl", description="Self-supervised pretraining of vision transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a backbone, then evaluate it")
    p.add_argument("--config", "-c", help=f"preset name or YAML path (default {DEFAULT_PRESET})")
    p.add_argument("--resume", help="run folder (its newest checkpoint) or checkpoint file")
    p.add_argument("--data-root", help="folder holding the dataset (same as data.root=DIR)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
    p.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("eval", help="k-NN and linear probe of a run or checkpoint")
    e.add_argument("target", help="run folder (its newest checkpoint) or checkpoint file")
    e.add_argument("--data-root", help="folder holding the dataset (same as data.root=DIR)")
    e.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.knn_k=10")
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser(
        "sweep", help="train a preset at many settings, rank them by k-NN",
        description="Each key=a,b,c lists values (every combination is trained); key=low..high "
        "(:log) is a range, sampled with --trials N; a key with one value is fixed (the budget, "
        "e.g. data.subset=12288 optim.epochs=5). Rerunning the same command continues the sweep.")
    w.add_argument("--config", "-c", required=True, help="preset name or YAML path")
    w.add_argument("--out", help="sweep folder (default runs/sweep-PRESET)")
    w.add_argument("--trials", type=int, help="sample N points with Optuna's TPE instead of "
                   "training the whole grid")
    w.add_argument("--eval-train", type=int, default=10_000,
                   help="k-NN bank: the first N training images (default 10000)")
    w.add_argument("--eval-test", type=int, default=2_000,
                   help="scored: the first N test images (default 2000)")
    w.add_argument("--linear", action="store_true", help="also score a linear probe")
    w.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    w.add_argument("--workers", type=int, default=1,
                   help="train N points of the grid side by side, each in its own process "
                   "(give each trainer.num_threads=CORES/N); default 1")
    w.add_argument("--data-root", help="folder holding the dataset (same as data.root=DIR)")
    w.add_argument("settings", nargs="*", help="key=a,b (values), key=low..high[:log] (range) "
                   "or key=value (fixed)")
    w.set_defaults(func=cmd_sweep)

    a = sub.add_parser("analyze", help="attention and collapse metrics, attention maps and an "
                       "HTML report of a run or checkpoint")
    a.add_argument("target", help="run folder (its newest checkpoint) or checkpoint file")
    a.add_argument("--out", help="folder for analysis.json, figures/ and report.html "
                   "(default: the run folder)")
    a.add_argument("--images", type=int, default=256,
                   help="test images the attention statistics average over")
    a.add_argument("--flow-images", type=int, default=2,
                   help="images (of the 4 drawn) whose class-token attention flow is solved "
                   "(0: none; seconds each for 4 layers of 50 tokens, growing as layers x "
                   "tokens^3)")
    a.add_argument("--data-root", help="folder holding the dataset (same as data.root=DIR)")
    a.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.features=mean")
    a.set_defaults(func=cmd_analyze)

    x = sub.add_parser("export", help="the pretrained backbone as safetensors + a config.json "
                       "that timm loads")
    x.add_argument("target", help="run folder (its newest checkpoint) or checkpoint file")
    x.add_argument("--out", required=True, help="folder for model.safetensors and config.json")
    x.add_argument("--data-root", help="folder holding the dataset (same as data.root=DIR)")
    x.add_argument("overrides", nargs="*", help="section.key=value")
    x.set_defaults(func=cmd_export)

    h = sub.add_parser("shard", help="write an image folder as litdata shards for "
                       "data.dataset=shards (bad files listed and skipped)")
    h.add_argument("src", help="image folder: class sub-folders (labels) or flat, with train/ and "
                   "test/ (or val/) splits where present")
    h.add_argument("dst", help="new folder for the shards")
    h.add_argument("--image-size", type=int, default=256,
                   help="stored side in pixels (shorter side resized, centre-cropped)")
    h.add_argument("--chunk-mb", type=int, default=64, help="size of each shard file")
    h.set_defaults(func=cmd_shard)

    t = sub.add_parser("theory", help="the theory paper's synthetic experiment: MAE against "
                       "contrastive learning on a one-layer softmax attention")
    t.add_argument("--out", default="runs/theory", help="folder for theory.json/.md/.png")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--lr", type=float, default=0.5)
    t.add_argument("--mask-prob", type=float, default=0.5)
    t.add_argument("--grid", type=int, default=6, help="patches per side")
    t.add_argument("--local-scale", type=float, default=0.3,
                   help="magnitude of the local features (global: imbalance x this range)")
    t.add_argument("--imbalance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=1,
                   help="attention layers in the stack (each its own Q, all from 0)")
    t.add_argument("--attention", choices=["softmax", "linear"], default="softmax",
                   help="the one layer's attention: softmax (the paper's) or linear (elu+1)")
    t.set_defaults(func=cmd_theory)

    s = sub.add_parser("presets", help="list the config presets")
    s.set_defaults(func=cmd_presets)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` words accepted after an option too (``attnssl eval
    RUN --data-root DIR eval.features=mean``): argparse ends a positional list at the first
    option, so the words after it are added to the command's list in the order given."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    listed = next((name for name in ("overrides", "settings") if hasattr(args, name)), None)
    if extra and listed and all("=" in word and not word.startswith("-") for word in extra):
        setattr(args, listed, [*getattr(args, listed), *extra])
    elif extra:
        parser.parse_args(argv)  # argparse's own message naming the arguments it did not take
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"attnssl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
