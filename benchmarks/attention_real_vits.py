"""The theory paper's contrast on real ViTs: attention of the protocol-B1 checkpoints.

For each fp32 row of ``results/b1.json`` (the checkpoints ``b1_pretrain.py`` left in its run
folders) and for the untrained backbones those runs started from (softmax and CBSA), runs
:func:`attnssl.analysis.analyze_backbone` on the first Fashion-MNIST test images: patch-to-patch
attention entropy, mean attention distance (px) and diversity across queries, per layer; the
class-token attention's segmentation Jaccard against the garments' silhouettes (non-zero pixels)
in the last layer; the effective rank of the evaluation features. Writes
``results/attention.json`` and, with ``--readme``, its block ``ATTENTION`` (docs/results.md).

    python -m benchmarks.attention_real_vits --readme
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnssl.analysis import analyze_backbone
from benchmarks.b1_checkpoints import B1_JSON, fp32_checkpoints, untrained_backbone
from benchmarks.helpers import ROOT, machine_line, replace_readme_block


def analyse(backbone, dataset, features: str, images: int) -> dict:
    result, _ = analyze_backbone(backbone, dataset, features, images)
    return {k: result[k] for k in ("per_layer", "per_head", "segmentation", "collapse",
                                   "uniform_entropy")}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backbone | attention | entropy (nats), layers 1..L | distance (px), layers 1..L "
        "| diversity, layers 1..L | CLS Jaccard, last layer (head mean / best head) "
        "| effective rank |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        layer, seg = row["per_layer"], row["segmentation"]
        lines.append(
            f"| {row['label']} | {row['attention']} | "
            + " | ".join(" / ".join(f"{v:{fmt}}" for v in layer[name])
                         for name, fmt in (("entropy", ".2f"), ("distance", ".1f"),
                                           ("diversity", ".2f")))
            + f" | {seg['last_layer_head_mean']:.3f} / {seg['last_layer_best_head']:.3f} | "
            f"{row['collapse']['effective_rank']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b1", default=str(B1_JSON))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attention.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()

    rows, floors = [], {}
    for b1_row, loaded in fp32_checkpoints(Path(args.b1)):
        config = loaded.config
        features = config.eval.features
        rows.append({"label": b1_row["method"], "attention": config.model.attention,
                     "knn_top1": b1_row.get("knn_top1"), "run_dir": b1_row["run_dir"],
                     **analyse(loaded.backbone, loaded.test, features, args.images)})
        print(f"{b1_row['method']}: done", flush=True)
        key = (config.model.attention, config.model.weight_init, config.model.pos_embed)
        if key not in floors:
            floors[key] = {"label": f"untrained ({config.model.weight_init} init, "
                                    f"{config.model.pos_embed} positions)",
                           "attention": config.model.attention,
                           **analyse(untrained_backbone(loaded), loaded.test, "cls",
                                     args.images)}
    rows += list(floors.values())
    table = markdown(rows)
    print(table)
    from attnssl.train.environment import machine_description

    machine = machine_description()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "images": args.images, "rows": rows},
                              indent=2))
    if args.readme:
        command = f"python -m benchmarks.attention_real_vits --images {args.images} --readme"
        replace_readme_block("ATTENTION", machine_line(machine, command) + "\n\n" + table)


if __name__ == "__main__":
    main()
