"""Method by attention at the screening budget (docs/benchmarks.md): what each attention layer
learns under each method.

For each method and attention, one point of ``attnssl sweep`` at the peer budget (the first
12,288 Fashion-MNIST training images, 5 epochs: 240 steps of 256), scored by the sweep's k-NN
(bank: the first 20,000 training images; scored: the first 5,000 test images) beside the same
backbone untrained, then ``attnssl analyze`` on the trained point: per layer, the patch
attention's entropy and diversity across queries, and the rank collapse of the block's output
tokens. The default grid is the one the attention issue asks for: BAM and MAE on every
registered attention, SimCLR and DINO on softmax, CBSA and linear attention. Each point keeps
its run folder, so a rerun continues where it stopped.

    python -m benchmarks.attention_by_method --readme
    python -m benchmarks.attention_by_method --methods mae --attentions softmax linear
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnssl.analysis import analyze_backbone
from attnssl.eval.evaluate import load_trained_backbone
from attnssl.nn.attention import ATTENTION_LAYERS
from attnssl.sweep import SweepSpec, run_sweep
from attnssl.train.environment import machine_description
from benchmarks.helpers import ROOT, machine_line, replace_readme_block

BUDGET = ["data.subset=12288", "optim.epochs=5"]
EVERY = ("bam", "mae")
SOME = {"simclr": ("softmax", "cbsa", "linear"), "dino": ("softmax", "cbsa", "linear")}
# CBSA and its cases pool a grid of representatives; on B1's 7x7 patches use 16 (4x4)
POOLED = ("cbsa", "agent")


def grid(methods: list[str], attentions: list[str] | None) -> list[tuple[str, str]]:
    every = sorted(a for a in ATTENTION_LAYERS if a != "softmax_explicit")
    pairs = []
    for method in methods:
        chosen = attentions or (every if method in EVERY else SOME.get(method, ("softmax",)))
        pairs += [(method, attention) for attention in chosen]
    return pairs


def point(method: str, attention: str, out: Path, threads: int | None,
          budget: list[str] = BUDGET, scored: tuple[int, int] = (20000, 5000)) -> dict:
    settings = [*budget, f"model.attention={attention}"]
    if attention in POOLED:
        settings.append("model.cbsa_pool=4")
    if threads:
        settings.append(f"trainer.num_threads={threads}")
    spec = SweepSpec.from_arguments(f"{method}_fashion_mnist", settings, eval_train=scored[0],
                                    eval_test=scored[1])
    (result,) = run_sweep(spec, out / f"{method}-{attention}")
    if "error" in result:
        return {"method": method, "attention": attention, "error": result["error"]}
    loaded = load_trained_backbone(result["run_dir"])
    analysis, _ = analyze_backbone(loaded.backbone, loaded.test, loaded.config.eval.features,
                                   images=256)
    layer = analysis["per_layer"]
    return {"method": method, "attention": attention, "knn_top1": result["knn_top1"],
            "knn_floor": result["knn_floor"], "images_per_second": result["images_per_second"],
            "entropy": layer["entropy"], "diversity": layer["diversity"],
            "rank_collapse": layer["rank_collapse"],
            "uniform_entropy": analysis["uniform_entropy"]}


def table(rows: list[dict]) -> str:
    def per_layer(values):
        return " / ".join(f"{v:.2f}" for v in values)

    lines = ["| method | attention | k-NN | random init | images/s | entropy per layer (nats) | "
             "diversity per layer | rank collapse per layer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['attention']} | failed: {r['error']} |" + " |" * 5)
            continue
        lines.append(f"| {r['method']} | {r['attention']} | {r['knn_top1']:.2f} | "
                     f"{r['knn_floor']:.2f} | {r['images_per_second']:.0f} | "
                     f"{per_layer(r['entropy'])} | {per_layer(r['diversity'])} | "
                     f"{per_layer(r['rank_collapse'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["bam", "mae", "simclr", "dino"])
    parser.add_argument("--attentions", nargs="+", default=None,
                        help="the same attentions for every method (default: the grid above)")
    parser.add_argument("--threads", type=int, default=None, help="trainer.num_threads")
    parser.add_argument("--budget", nargs="+", default=BUDGET,
                        help="the training budget's settings (default: the screening budget)")
    parser.add_argument("--eval-train", type=int, default=20000)
    parser.add_argument("--eval-test", type=int, default=5000)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "attention-by-method"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "attention_by_method.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    rows = [point(m, a, Path(args.runs_dir), args.threads, args.budget,
                  (args.eval_train, args.eval_test))
            for m, a in grid(args.methods, args.attentions)]
    markdown = table(rows)
    print(markdown)
    machine = machine_description()
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    if args.readme:
        # the thread count is part of each point's settings: a rerun without it trains anew
        command = "python -m benchmarks.attention_by_method " + " ".join(
            ["--methods", *args.methods] + (["--attentions", *args.attentions]
                                             if args.attentions else [])
            + ([f"--threads {args.threads}"] if args.threads else []))
        replace_readme_block("ATTENTION-BY-METHOD", machine_line(machine, command) + "\n\n"
                             + markdown)


if __name__ == "__main__":
    main()
