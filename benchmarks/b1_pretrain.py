"""Protocol B1 (v1, docs/benchmarks.md; superseded by B1 v2): Fashion-MNIST, small ViT, CPU.

Pretrains each method's Fashion-MNIST preset as it is now (SimCLR and MAE as the rows were run:
``SIMCLR_TWO_VIEWS``, ``MAE_ONE_SAMPLE``) in each precision on the timm ViT img 28 / patch 4 /
width 128 / depth 4 / 4 heads, batch 256, 5 epochs, then scores the preset's read-out with
weighted k-NN (k=20, cosine, T=0.07) and a linear probe. Prints a table beside the two floors
(raw pixels and the random-init backbone), writes ``benchmarks/results/b1.json`` and, with
``--readme``, replaces the B1 table in docs/results.md.

The stored table is historical: it was made on 2026-11-22 (commits da092fc to d9eb640, where
this script ran as ``python benchmarks/b1_pretrain.py``) when the presets used crops and flips
only (two global crops at scale (0.4, 1)) and BAM an EMA teacher. The presets have been tuned
since (docs/presets.md), so running this today trains different recipes; B1 v2
(``benchmarks.b1v2``) is the current table, and its crops-and-flips rows show what the views buy.

    python -m benchmarks.b1_pretrain --methods mae --precisions 32   # one row, presets of today
    python -m benchmarks.b1_pretrain --epochs 1 --subset 15360         # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnssl.config import load_config
from attnssl.data.datasets import DatasetSpec, load_dataset
from attnssl.eval.evaluate import backbone_image_size, evaluate_features, load_eval_splits
from attnssl.eval.knn import knn_accuracy
from attnssl.nn.vit import build_vit
from attnssl.train.environment import machine_description
from attnssl.train.trainer import pretrain
from benchmarks.helpers import MAE_ONE_SAMPLE, ROOT, SIMCLR_TWO_VIEWS, machine_line, replace_readme_block

# row name -> (preset, overrides); "bam-cbsa" is BAM on a backbone whose attention is CBSA
# (representatives pooled on a 4x4 grid of the 7x7 patches: 16 for 50 tokens)
PRESETS = {
    "bam": ("bam_fashion_mnist", []), "dino": ("dino_fashion_mnist", []),
    "udi": ("udi_fashion_mnist", []),
    "simclr": ("simclr_fashion_mnist", SIMCLR_TWO_VIEWS),  # two views per image, as B1 v1
    "mae": ("mae_fashion_mnist", MAE_ONE_SAMPLE),  # one sample per image, as B1 v1
    "bam-cbsa": ("bam_fashion_mnist", ["model.attention=cbsa", "model.cbsa_pool=4"]),
}
# rows of the studies in docs/results.md, run on request only: MAE with the decoder's input and output
# linears at torch's default init (lightly 1.6's choice; docs/results.md, "MAE against lightly")
STUDIES = {"mae-torch-io": ("mae_fashion_mnist", [*MAE_ONE_SAMPLE,
                                                  "method.decoder_io_init=torch"])}
# UDI has two class tokens: which one to evaluate is a choice (its official k-NN takes cls);
# MAE's official linear probe reads the class token, its fine-tuning the mean patch token
EXTRA_FEATURES = {"udi": ("cls_plus", "cls+cls_plus"), "mae": ("mean",), "mae-torch-io": ("mean",)}


def raw_pixel_knn(k: int = 20, temperature: float = 0.07, data_root: str | None = None) -> float:
    train = load_dataset(DatasetSpec("fashion-mnist", root=data_root), "train")
    test = load_dataset(DatasetSpec("fashion-mnist", root=data_root), "test")
    flat = lambda ds: ds.images.flatten(1).float() / 255  # noqa: E731
    return knn_accuracy(flat(train), train.labels, flat(test), test.labels, 10, k, temperature)


def run_row(method: str, precision: str, args, out_dir: Path) -> dict:
    overrides = [
        f"trainer.precision={precision}", f"optim.epochs={args.epochs}",
        f"run.out_dir={out_dir}", f"run.name=b1-{method}-{precision}-{int(time.time())}",
        "trainer.progress_bar=false", "trainer.checkpoint_every_steps=100000",
    ]
    if args.subset:
        overrides.append(f"data.subset={args.subset}")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    preset, method_overrides = {**PRESETS, **STUDIES}[method]
    config = load_config(preset, [*method_overrides, *overrides])
    metrics = pretrain(config)
    ev = metrics["eval"]
    row = {
        "method": method, "precision": precision, "epochs": args.epochs,
        "train_images": args.subset or 60000, "knn_top1": ev["knn_top1"],
        "linear_top1": ev["linear_top1"], "knn_top1_random_init": ev["knn_top1_random_init"],
        "images_per_second": metrics["images_per_second"],
        "train_minutes": metrics["train_seconds"] / 60, "run_dir": metrics["run_dir"],
    }
    if method in EXTRA_FEATURES:
        row["knn_top1_by_features"] = {
            config.eval.features: ev["knn_top1"],
            **knn_by_features(Path(metrics["run_dir"]), config, EXTRA_FEATURES[method]),
        }
    return row


def knn_by_features(run_dir: Path, config, kinds) -> dict[str, float]:
    """k-NN of the run's exported backbone with other feature kinds."""
    from safetensors.torch import load_file

    train, test = load_eval_splits(config)
    backbone = build_vit(config.model, backbone_image_size(config, train), train.channels)
    backbone.load_state_dict(load_file(str(run_dir / "backbone.safetensors")))
    scores = {}
    for kind in kinds:
        kind_config = config.model_copy(
            update={"eval": config.eval.model_copy(update={"features": kind})})
        scores[kind] = evaluate_features(backbone, kind_config, train, test, linear=False)["knn_top1"]
    return scores


def table(rows: list[dict], raw_pixels: float) -> str:
    lines = [
        "| method | precision | epochs | k-NN top-1 | linear top-1 | random-init k-NN | "
        "images/s | train min | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        verdict = "above raw pixels" if r["knn_top1"] > raw_pixels else "below raw pixels"
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['epochs']} | {r['knn_top1']:.2f} | "
            f"{r['linear_top1']:.2f} | {r['knn_top1_random_init']:.2f} | "
            f"{r['images_per_second']:.0f} | {r['train_minutes']:.1f} | {verdict} |"
        )
    lines.append(f"| raw pixels (floor) | - | - | {raw_pixels:.2f} | - | - | - | - | - |")
    for r in rows:
        if "knn_top1_by_features" in r:
            scores = ", ".join(f"`{k}` {v:.2f}" for k, v in r["knn_top1_by_features"].items())
            lines.append(f"\n{r['method']} ({r['precision']}) k-NN by evaluated token: {scores}.")
    return "\n".join(lines)


def merge_rows(previous: list[dict], new: list[dict]) -> list[dict]:
    """Rows of earlier runs stay unless this run measured the same method and precision."""
    measured = {(r["method"], r["precision"]) for r in new}
    kept = [r for r in previous if (r["method"], r["precision"]) not in measured]
    order = list(PRESETS)
    return sorted(kept + new, key=lambda r: (order.index(r["method"]) if r["method"] in order
                                            else len(order), r["precision"] != "32"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(PRESETS),
                        choices=[*PRESETS, *STUDIES])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subset", type=int, default=None, help="pretrain on the first N images")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b1.json"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "benchmarks"))
    parser.add_argument("--readme", action="store_true", help="replace the B1 table in docs/results.md")
    parser.add_argument("--fresh", action="store_true",
                        help="drop the rows of earlier runs instead of keeping the unmeasured ones")
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    machine = machine_description()
    raw = raw_pixel_knn(data_root=args.data_root)
    rows = []
    for method in args.methods:
        for precision in args.precisions:
            rows.append(run_row(method, precision, args, Path(args.runs_dir)))
            print(table(rows, raw), flush=True)
    out = Path(args.out)
    command = "python -m benchmarks.b1_pretrain " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k in ("methods", "precisions", "epochs", "subset") and v is not None
    )
    for row in rows:
        row["command"] = command
    if out.is_file() and not args.fresh:
        rows = merge_rows(json.loads(out.read_text())["rows"], rows)
    markdown = table(rows, raw)
    print(f"\nB1 on {machine['cpu']} ({machine['threads']} threads, torch {machine['torch']})")
    print(markdown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "raw_pixel_knn_top1": raw, "rows": rows},
                              indent=2))
    if args.readme:
        commands = sorted({r.get("command", command) for r in rows})
        replace_readme_block("B1", machine_line(machine, "`; `".join(commands)) + "\n\n" + markdown)


if __name__ == "__main__":
    main()
