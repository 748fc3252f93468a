"""fp32 levers on the B1 training step, side by side: what a CPU without bf16 hardware can gain.

On an AVX2-only CPU bf16 is emulated (slow), so only fp32 levers remain. Each method's B1
step (``b1_pretrain.PRESETS``) runs in three variants built from the same seed, alternating
variant by variant in rounds on the same batches:

- ``default``: as shipped (fused ``scaled_dot_product_attention`` in fp32);
- ``explicit``: ``model.attention=softmax_explicit``, ``softmax(q k^T / sqrt(d)) v`` as matmuls;
- ``compiled``: ``trainer.compile=true``, every transformer block compiled with ``torch.compile``
  (regional compilation: blocks of one shape share their code, so compiling stays short); the
  first compiled step's time, compilation included, is reported apart (dynamo is reset before
  each method; inductor's disk cache may still hold kernels of the same shapes).

Prints images/s (median over rounds) and each variant's speed relative to ``default``; writes
``results/fp32_levers.json``; ``--readme`` replaces the block LEVERS (docs/results.md).

    python -m benchmarks.fp32_levers --readme
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attnssl.train.environment import machine_description
from attnssl.train.trainer import Pretrainer
from benchmarks.b1_pretrain import PRESETS
from benchmarks.b2_utilisation import batches, build_trainer
from benchmarks.helpers import ROOT, machine_line, replace_readme_block

VARIANTS = {"default": [], "explicit": ["model.attention=softmax_explicit"],
            "compiled": ["trainer.compile=true"]}


def compile_and_warm(trainer: Pretrainer, warm_batch: torch.Tensor) -> float:
    """Seconds until a step has run compiled (``trainer.compile=true`` compiles the blocks at
    setup; the first step compiles them)."""
    start = time.perf_counter()
    trainer.training_step(warm_batch)
    return time.perf_counter() - start


def measure(method: str, rounds: int, round_steps: int, out_dir: Path) -> dict:
    torch._dynamo.reset()  # each method compiles its own blocks (inductor's disk cache stays)
    trainers = {name: build_trainer(method, "32", out_dir, extra, f"{method}-{name}")
                for name, extra in VARIANTS.items()}
    size = trainers["default"].batch_per_process
    images = list(batches(trainers["default"], round_steps + 1))
    compile_s = compile_and_warm(trainers["compiled"], images[0])
    seconds = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            trainer.training_step(images[0])  # warm: caches and thread pools
            start = time.perf_counter()
            for batch in images[1:]:
                trainer.training_step(batch)
            seconds[name].append((time.perf_counter() - start) / round_steps)
    images_per_s = {name: size / statistics.median(s) for name, s in seconds.items()}
    return {"method": method, "batch": size, "images_per_s": images_per_s,
            "speed_vs_default": {name: v / images_per_s["default"]
                                 for name, v in images_per_s.items()},
            "compile_s": compile_s}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | default img/s | explicit attention | torch.compile (blocks) | compile time |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        ips, speed = row["images_per_s"], row["speed_vs_default"]
        lines.append(f"| {row['method']} | {ips['default']:.0f} | {speed['explicit']:.2f}x | "
                     f"{speed['compiled']:.2f}x | {row['compile_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dino", "simclr", "mae"],
                        choices=list(PRESETS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fp32_levers.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows.append(measure(method, args.rounds, args.round_steps, Path(tmp)))
            print(markdown(rows).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    machine = machine_description()
    command = (f"python -m benchmarks.fp32_levers --methods {' '.join(args.methods)} "
               f"--rounds {args.rounds} --round-steps {args.round_steps} --readme")
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows, "command": command},
                                         indent=2))
    if args.readme:
        note = (f"Speeds relative to `default` (fused attention, eager), medians of "
                f"{args.rounds} alternating rounds of {args.round_steps} steps.")
        replace_readme_block("LEVERS", f"{table}\n\n{note}\n\n{machine_line(machine, command)}")


if __name__ == "__main__":
    main()
