"""The first losses of a fixed-seed run of every method: a fingerprint of the training maths.

A refactor that must not change behaviour (the method registry, the trainer split) is checked
by running this before and after it on one machine and comparing the two files: every loss of
the first ``--steps`` steps must be identical, bit for bit (fp32, one thread, the synthetic
presets, seed 0).

    python -m benchmarks.first_losses --out before.json          # at the old commit
    python -m benchmarks.first_losses --compare before.json      # at the new one
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

from attnssl.config import load_config
from attnssl.train.trainer import pretrain

METHODS = ("bam", "simclr", "mae", "dino", "udi")


def first_losses(method: str, steps: int, out_dir: str) -> list[float]:
    config = load_config(f"{method}_synthetic", [
        f"run.out_dir={out_dir}", f"run.name={method}", "run.seed=0", "trainer.precision=32",
        "trainer.num_threads=1", "trainer.log_every_steps=1", f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every_steps={steps}", "trainer.progress_bar=false",
        "optim.epochs=100", "eval.at_end=false"])
    pretrain(config)
    with open(Path(out_dir) / method / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", help="write the losses to this JSON file")
    parser.add_argument("--compare", help="compare with the losses in this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        losses = {m: first_losses(m, args.steps, tmp) for m in args.methods}
    if args.out:
        Path(args.out).write_text(json.dumps(losses, indent=2))
    if not args.compare:
        print(json.dumps(losses))
        return
    before = json.loads(Path(args.compare).read_text())
    differ = [m for m in losses if before.get(m) != losses[m]]
    for m in losses:
        print(f"{m}: {len(losses[m])} losses, {'differ' if m in differ else 'identical'}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
